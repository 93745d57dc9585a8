"""NPO on forget chunks plus gradient descent on the retain split (NPO+GD; MUSE's NPO_GDR). Not one of
the paper's seven methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("npo_gd", preset=preset)
