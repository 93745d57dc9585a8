"""Multiple-choice tasks (``acc`` and ``acc_norm`` as lm-evaluation-harness defines them); task specs are
``FORMAT:PATH[:CONFIG[:SPLIT]]`` (see :mod:`jaxunlearn.evaluation.multiple_choice`). lm-eval's group scores come
with them: ``wmdp`` (bio, chem and cyber weighted by size) once all three are scored, and MMLU's four categories
(``mmlu_stem``, ...) for a task of several MMLU subjects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxunlearn.evaluation.multiple_choice import WMDP_GROUP, load_task, mmlu_categories, score_task, weighted_mean
from jaxunlearn.evaluation.registry import EvalContext, Option, register_metric
from jaxunlearn.evaluation.tables import table

BOS_SETTINGS = {"default": None, "true": True, "false": False}

OPTIONS = {
    "specs": Option(("",), None, "task specs FORMAT:PATH[:CONFIG[:SPLIT]]"),
    "max_items": Option(0, lambda v: v >= 0, ">= 0 (0 = all)"),
    # lm-eval's HFLM `add_bos_token` model argument: unset ("default") = the tokenizer's own special tokens (BOS for
    # Llama and Mistral), lm-eval's default since 0.4.10; "true"/"false" = lm-eval's add_bos_token=True/False.
    "add_bos_token": Option(
        "default",
        lambda v: v in BOS_SETTINGS,
        "default (the tokenizer's own special tokens, as lm-eval), true or false",
    ),
}


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    return ["## Multiple-choice tasks", "", *table(results, "task", [("acc", "acc"), ("acc_norm", "acc_norm")], 3)]


# version 2: BOS as lm-eval 0.4.13 adds it, the wmdp group and the MMLU categories
@register_metric("tasks", report=report, options=OPTIONS, version=2)
def tasks(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{task: {acc, acc_norm, ...}}`` for every spec in ``options["specs"]`` (nothing when there is none)."""
    results: dict[str, Any] = {}
    wmdp: dict[str, dict[str, Any]] = {}  # WMDP configuration -> its result
    for spec in (s for s in options["specs"] if s):
        name, items = load_task(spec, options["max_items"])

        def score_pairs(pairs, name=name):
            return ctx.evaluator.score_continuations(ctx.params, pairs, ctx.max_length, desc=f"task {name}")

        results[name] = score_task(score_pairs, ctx.tokenizer, items, BOS_SETTINGS[options["add_bos_token"]])
        fmt, parts = spec.partition(":")[0], spec.split(":")
        if fmt == "wmdp" and len(parts) > 2 and parts[2] in WMDP_GROUP:
            wmdp[parts[2]] = results[name]
        if fmt == "mmlu" and "subjects" in results[name]:
            for group, value in mmlu_categories(results[name]["subjects"]).items():
                results[group if group not in results else f"{name}/{group}"] = value
    if set(wmdp) == set(WMDP_GROUP):  # lm-eval's group is all three; a partial one would be another number
        group = [wmdp[c] for c in WMDP_GROUP]
        key = "wmdp" if "wmdp" not in results else "wmdp (group)"
        results[key] = {
            "acc": weighted_mean([r["acc"] for r in group], [r["n"] for r in group]),
            "n": sum(r["n"] for r in group),
        }
    return results or None
