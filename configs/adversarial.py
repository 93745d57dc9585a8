"""Unlearning with adversarial samples: the original model's best wrong next token."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("adversarial", preset=preset)
