"""How far a model is from the exact retrain without the forget set (the built-in world's oracle, or any
``evaluation.oracle_model``): forget-perplexity ratio, membership-AUC differences, and the mean
``KL(oracle || model)`` per token on forget and on retain chunks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxunlearn.evaluation.registry import EvalContext, register_metric, subset
from jaxunlearn.evaluation.tables import fmt

KL_SPLITS = ("forget", "retain")


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    keys = list(next(iter(results.values())))
    lines = [
        "## Distance to the oracle (exact retrain without the forget set)",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|" + "---|" * (1 + len(keys)),
    ]
    lines += [f"| {n} | " + " | ".join(fmt(d.get(k), 4) for k in keys) + " |" for n, d in results.items()]
    return lines + [""]


@register_metric("oracle_distance", report=report)
def oracle_distance(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, float] | None:
    """Needs the oracle and this model's ``perplexity`` and ``mia`` results (list it after them)."""
    if ctx.oracle is None or "perplexity" not in ctx.results or "mia" not in ctx.results:
        return None
    mine, oracle = ctx.results, ctx.oracle.results
    out = {
        "forget_ppl_ratio": mine["perplexity"]["forget"]["ppl"] / oracle["perplexity"]["forget"]["ppl"],
        "min_k_0.4_auc_diff": mine["mia"]["min_k_0.4"]["auc"] - oracle["mia"]["min_k_0.4"]["auc"],
        "loss_auc_diff": mine["mia"]["loss"]["auc"] - oracle["mia"]["loss"]["auc"],
    }
    for split in KL_SPLITS:
        if split in ctx.splits:
            chunks = ctx.splits[split]
            idx = subset(len(chunks), ctx.max_chunks)
            kl = ctx.evaluator.sequence_kl(
                ctx.oracle.params, ctx.params, chunks.tokens[idx], chunks.mask[idx], chunks.prompts[idx]
            )
            out[f"kl_{split}"] = float(np.mean(kl))
    return out
