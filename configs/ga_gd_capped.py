"""Gradient ascent with the ascent capped per chunk + gradient descent on in-distribution retain data: GA+GD whose
forget chunks stop being pushed once their NLL reaches the original model's NLL on unseen text plus 0.5 nats
(``forget_nll_cap_margin``, derived before training from the approximate split).

On the built-in world the cap is the brake: the stopping rule is off (the run takes its 4 epochs) and the forget
term weighs 0.2. The capped ascent and the retain descent settle at an equilibrium where forget text looks unseen,
chunk by chunk, so membership inference falls to the oracle's level; the three-world comparison (docs/builtin-world.md) chose
these settings (forget perplexity within 10% and Min-K% AUC within 0.05 of the oracle's on each world)."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set), or a benchmark's."""
    config = base_config("ga_gd", preset=preset)
    config.method.forget_nll_cap_margin = 0.5
    if preset == "builtin":
        config.method.forget_weight = 0.2
        config.evaluation.stop_approx_multiple = 0.0
    elif preset.startswith("smollm2"):
        # The real model's stdlib chunks spread widely in NLL: a tight cap (0.1 nats over unseen code's NLL) stops
        # each one near unseen text's level instead of pushing the easy ones far past it.
        config.method.forget_nll_cap_margin = 0.1
    return config
