"""The relearning attack (Hu et al. 2024; Deeb & Roger 2024): each model fine-tuned for a few steps on held-out
forget documents (``forget``) or on related text (``retain``), then measured on the other forget documents: forget
perplexity and Min-K% AUC along the way, and how many steps it takes to get back to the original model's level.
The original, unlearned and oracle models get the same attack; the oracle learning the text for the first time is
the true baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxunlearn.attacks.relearn import Relearner, Settings, split_by_document, steps_to_reach
from jaxunlearn.common.settings import parse_list
from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.registry import EvalContext, Option, register_metric, split_stats
from jaxunlearn.evaluation.tables import section

MEMBERS, NONMEMBERS, K = "forget", "approximate", 0.4
# What each model is fine-tuned on: held-out forget documents, or the retain split (related, not the forget text).
CORPORA = {"forget": "held-out forget documents", "retain": "related text (the retain split)"}


OPTIONS = {
    "corpora": Option(
        "", lambda v: all(c in CORPORA for c in parse_list(v)), f"comma-separated from {tuple(CORPORA)} ('' = off)"
    ),
    "steps": Option(20, lambda v: v >= 1, ">= 1"),
    "lr": Option(1e-5, lambda v: v > 0, "must be > 0"),
    "batch_size": Option(8, lambda v: v >= 1, ">= 1"),
    "every": Option(2, lambda v: v >= 1, ">= 1 (steps between measurements)"),
    "holdout_fraction": Option(0.5, lambda v: 0 < v < 1, "in (0, 1): the share of forget documents relearned on"),
    "max_chunks": Option(64, lambda v: v >= 0, ">= 0 (measured chunks per split at each point; 0 = all)"),
    "seed": Option(0, lambda v: v >= 0, ">= 0"),
}


def _point(ctx: EvalContext, params: dict, measured: Any, limit: int) -> dict[str, float]:
    """Forget (measured documents) and approximate perplexity and their Min-K% AUC, for ``params``."""
    forget = split_stats(ctx.evaluator, params, measured, limit, "relearn: forget", moments=False)
    unseen = split_stats(ctx.evaluator, params, ctx.splits[NONMEMBERS], limit, "relearn: approximate", moments=False)
    return {
        "forget_ppl": M.perplexity_metrics(forget)["ppl"],
        "approximate_ppl": M.perplexity_metrics(unseen)["ppl"],
        "auc": M.paired_min_k_auc(forget, unseen, K),
    }


def _finalize(results: dict[str, dict[str, Any]], options: Mapping[str, Any]) -> None:
    """Steps each model takes to get back to the original's forget perplexity (before relearning), per corpus."""
    original = results.get("original", {}).get("relearning")
    if not original:
        return
    for model in results.values():
        attack = model.get("relearning")
        for corpus in parse_list(options["corpora"]):
            if attack and corpus in attack and corpus in original:
                level = original[corpus]["before"]["forget_ppl"]
                attack[corpus]["steps_to_original"] = steps_to_reach(attack[corpus]["curve"], level)


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    rows = {}
    for model, result in results.items():
        rows[model] = {
            corpus: {
                "forget_before": r["before"]["forget_ppl"],
                "forget_after": r["after"]["forget_ppl"],
                "auc_before": r["before"]["auc"],
                "auc_after": r["after"]["auc"],
                "steps": "-" if r.get("steps_to_original") is None else r["steps_to_original"],
            }
            for corpus, r in result.items()
            if not corpus.startswith("_")
        }
    fields = [
        ("forget_before", "forget ppl before"),
        ("forget_after", "forget ppl after"),
        ("auc_before", "Min-K% AUC before"),
        ("auc_after", "Min-K% AUC after"),
        ("steps", "steps to original"),
    ]
    measured = next(iter(results.values())).get("_measured", {})
    note = (
        f"Each model fine-tuned for {options['steps']} steps (lr {options['lr']:g}, {options['batch_size']} chunks per "
        f"step) on {' or '.join(CORPORA[c] for c in parse_list(options['corpora']))}, then measured on the other "
        f"{measured.get('forget_documents', '?')} forget documents ({measured.get('forget_chunks', '?')} chunks) "
        "against the approximate split. *steps to original*: the first step (measured every "
        f"{options['every']}) at which forget perplexity is back at the original model's level; `-` = not within "
        "the attack. The oracle's row is the baseline: text learned for the first time."
    )
    return section("Relearning attack", note, rows, "relearned on", fields, 4)


@register_metric("relearning", report=report, options=OPTIONS, finalize=_finalize)
def relearning(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{corpus: {before, after, curve, chunks}}`` (nothing without corpora, or without forget and approximate)."""
    corpora = parse_list(options["corpora"])
    if not corpora or MEMBERS not in ctx.splits or NONMEMBERS not in ctx.splits:
        return None
    settings = Settings(options["steps"], options["lr"], options["batch_size"], options["every"], options["seed"])
    key = ("relearning", settings)
    if key not in ctx.evaluator.compiled:
        ev = ctx.evaluator
        ctx.evaluator.compiled[key] = Relearner(ev.lm, ev.mesh, ev.rules, settings, ev.chunk_size)
    relearner: Relearner = ctx.evaluator.compiled[key]
    held_out, measured = split_by_document(ctx.splits[MEMBERS], options["holdout_fraction"], options["seed"])
    texts = {"forget": held_out, "retain": ctx.splits.get("retain")}
    out: dict[str, Any] = {}
    for corpus in corpora:
        if texts[corpus] is None:
            raise ValueError(
                f"config.evaluation.relearning.corpora={options['corpora']!r}: the run has no {corpus} split"
            )
        curve: list[dict[str, float]] = []

        def measure(step: int, params: dict, curve: list = curve) -> None:
            curve.append({"step": step, **_point(ctx, params, measured, options["max_chunks"])})

        relearner.run(ctx.evaluator.lm.merged(ctx.params), texts[corpus], measure)  # LoRA: it tunes every weight
        out[corpus] = {"before": curve[0], "after": curve[-1], "curve": curve, "chunks": len(texts[corpus])}
    out["_measured"] = {"forget_chunks": len(measured), "forget_documents": measured.num_documents}
    return out
