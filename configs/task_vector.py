"""Task-vector negation (Ilharco et al. 2023; MUSE's tv baseline): fine-tune a copy on the forget set, and take the
original minus alpha x the difference (--config.method.alpha) as the unlearned model; in-run evaluations and the
stopping rule measure that model. Not one of the paper's seven methods."""

from jaxunlearn.config import base_config


def get_config(preset: str = "builtin"):
    """``preset``: builtin (the offline built-in world), arxiv or github (the paper's data set)."""
    return base_config("task_vector", preset=preset)
