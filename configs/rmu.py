"""RMU (Li et al. 2024, the WMDP paper): steer one layer's activations on forget text to a fixed random
direction, keep them equal to the frozen original's on retain text, and train only a few parameters (official
defaults: loss after layer 7, the MLP down-projections of layers 5-7; --config.method.{layer,trainable_params,
steering_coeff,retain_weight}). Not one of the paper's seven methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("rmu", preset=preset)
