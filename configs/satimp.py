"""SatImp (Yang et al. 2025): token-weighted gradient ascent, each token's NLL weighted by p^beta1 (1 - p)^beta2,
plus gradient descent on retain chunks (--config.method.retain_weight=0 drops it). Not one of the paper's seven
methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("satimp", preset=preset)
