"""Gradient ascent with the ascent capped per chunk + gradient descent on in-distribution retain data: GA+GD whose
forget chunks stop being pushed once their NLL reaches the original model's NLL on unseen text plus 0.5 nats
(``forget_nll_cap_margin``, derived before training from the approximate split). On the built-in world this closes
the membership gap that the paper's uncapped objectives leave (see the README's capped-ascent study)."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    config = base_config("ga_gd", preset=preset)
    config.method.forget_nll_cap_margin = 0.5
    return config
