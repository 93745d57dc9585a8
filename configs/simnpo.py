"""SimNPO (Fan et al. 2024): NPO's bounded ascent on the length-normalised log-likelihood with a margin, no
reference model, plus gradient descent on retain chunks (--config.method.retain_weight=0 drops it). Not one of
the paper's seven methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("simnpo", preset=preset)
