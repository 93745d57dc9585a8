"""Task-vector negation: fine-tune on the forget set, then subtract the scaled difference from the original."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import Array, Needs, register

# --- task-vector negation -------------------------------------------------------------------------------------


def negated_task_vector(params: dict, ref_params: dict, hp: Mapping[str, Any]) -> dict:
    """``theta_0 - alpha (theta - theta_0)``: the original minus ``alpha`` x the fine-tuning difference, in the
    trained parameters' dtype."""
    alpha = hp["alpha"]

    def negate(p: Array, r: Array) -> Array:
        r = r.astype(p.dtype)
        return r - alpha * (p - r)

    return jax.tree.map(negate, params, ref_params)


@register("task_vector", needs=Needs(reference=True), transform=negated_task_vector, alpha=1.0)
def task_vector(params, ref_params, batch, rng, ctx: Context):
    """Task-vector negation (Ilharco et al. 2023, arXiv 2212.04089; MUSE's ``tv`` baseline): fine-tune on the forget
    chunks (gradient descent on their NLL); the unlearned model is the original minus ``alpha`` x the difference
    the fine-tuning made (:func:`negated_task_vector`), which every evaluation, the stopping rule and the export
    see. The train state holds the fine-tuned copy."""
    nll = ctx.mean_nll(params, ctx.split(batch, "forget"))
    return nll, {"forget_nll": nll}
