"""Gradient ascent on the forget set + KL to the original model on general (out-of-domain) retain data."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("ga_kl", preset=preset, retain="general")
