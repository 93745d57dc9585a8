"""CE-U (Yang et al. 2025): cross-entropy against the model's own next-token distribution with the true token
ruled out, on forget text; --config.method.retain_weight > 0 adds gradient descent on retain chunks. Not one of the
paper's seven methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("ce_u", preset=preset)
