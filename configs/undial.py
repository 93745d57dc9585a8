"""UNDIAL (Dong et al. 2024): self-distillation on forget text towards the original's distribution with the true
next token's logit lowered by beta (--config.method.beta); --config.method.retain_weight > 0 adds gradient descent
on retain chunks. Not one of the paper's seven methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("undial", preset=preset)
