"""Negative preference optimisation (Zhang et al. 2024) on the forget set; add a KL retain term with
--config.method.retain_weight (NPO+KL). Not one of the paper's seven methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("npo", preset=preset)
