"""Multiple-choice tasks (``acc`` and ``acc_norm`` as lm-evaluation-harness defines them); task specs are
``FORMAT:PATH[:CONFIG[:SPLIT]]`` (see :mod:`jaxunlearn.evaluation.multiple_choice`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxunlearn.evaluation.multiple_choice import load_task, score_task
from jaxunlearn.evaluation.registry import EvalContext, Option, register_metric
from jaxunlearn.evaluation.tables import table

OPTIONS = {
    "specs": Option(("",), None, "task specs FORMAT:PATH[:CONFIG[:SPLIT]]"),
    "max_items": Option(0, lambda v: v >= 0, ">= 0 (0 = all)"),
}


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    return ["## Multiple-choice tasks", "", *table(results, "task", [("acc", "acc"), ("acc_norm", "acc_norm")], 3)]


@register_metric("tasks", report=report, options=OPTIONS)
def tasks(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{task: {acc, acc_norm, ...}}`` for every spec in ``options["specs"]`` (nothing when there is none)."""
    results = {}
    for spec in (s for s in options["specs"] if s):
        name, items = load_task(spec, options["max_items"])

        def score_pairs(pairs, name=name):
            return ctx.evaluator.score_continuations(ctx.params, pairs, ctx.max_length, desc=f"task {name}")

        results[name] = score_task(score_pairs, ctx.tokenizer, items)
    return results or None
