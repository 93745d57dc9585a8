"""Exact memorisation and extraction strength of every evaluation split (open-unlearning's EM and ES)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.registry import EvalContext, register_metric
from jaxunlearn.evaluation.tables import section


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    fields = [("exact_memorization", "EM"), ("extraction_strength", "ES")]
    note = (
        "`EM`: the fraction of a chunk's next tokens that are the model's argmax (teacher-forced), averaged over "
        "chunks; `ES`: extraction strength, `1 - k/n` for the shortest prefix `k` after which every next token is "
        "the argmax. Both are near the unseen split's after unlearning when forgetting is real."
    )
    return section("Memorisation", note, results, "split", fields, 4)


# version 2: extraction strength 1/n where the last prediction is wrong, as open-unlearning
@register_metric("memorization", report=report, version=2)
def memorization(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
    """``{split: {exact_memorization, extraction_strength, chunks}}`` for every evaluation split."""
    return {split: M.memorization_metrics(ctx.stats(split)) for split in ctx.splits}
