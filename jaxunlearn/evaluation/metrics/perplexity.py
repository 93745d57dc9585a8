"""Perplexity and next-token accuracy of every evaluation split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.registry import EvalContext, register_metric
from jaxunlearn.evaluation.tables import section


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    fields = [("ppl", "ppl"), ("ppl_token", "ppl_token"), ("acc", "acc")]
    note = (
        "`ppl`: exp of the mean over chunks of the per-chunk mean NLL (the official definition); "
        "`ppl_token`: token-weighted."
    )
    return section("Perplexity and next-token accuracy", note, results, "split", fields, 4)


@register_metric("perplexity", report=report)
def perplexity(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
    """``{split: {ppl, ppl_token, nll, acc, acc_token, chunks, tokens}}`` for every evaluation split."""
    return {split: M.perplexity_metrics(ctx.stats(split)) for split in ctx.splits}
