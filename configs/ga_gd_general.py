"""Gradient ascent on the forget set + gradient descent on general (out-of-domain) retain data."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("ga_gd", preset=preset, retain="general")
