"""Membership inference: forget chunks (members) against as many approximate chunks (non-members), as the paper
does; every attack's AUC and TPR at low FPR, and MUSE's PrivLeak against a retrained model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxunlearn.data.arrays import Chunks
from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.registry import ARTIFACTS, EvalContext, Option, register_metric, subset
from jaxunlearn.evaluation.tables import fmt, table

MEMBERS, NONMEMBERS = "forget", "approximate"
GRADNORM_ORDERS = {"": 0.0, "l1": 1.0, "l2": 2.0, "linf": math.inf}
PRIVLEAK_ATTACK = "min_k_0.4"  # the attack MUSE's PrivLeak is defined on
KEY_ATTACKS = ("loss", "zlib", "min_k_0.2", "min_k_0.4", "min_k++_0.2", "reference")  # drawn in roc.png

OPTIONS = {
    "ks": Option(M.MIA_KS, lambda v: all(0 < k <= 1 for k in v), "fractions in (0, 1]"),
    "reference_model": Option("", None, "a model for the reference-ratio attack (HF directory or Hub id)"),
    # Min-K% (k=0.4) AUC of a retrained model for PrivLeak, on MUSE's scale (forget = non-members, as MUSE's
    # constants.py publishes them: news 0.4772, books 0.5393); 0 = unknown: the oracle's, else 0.5 (open-unlearning).
    "retrained_auc": Option(0.0, lambda v: 0 <= v <= 1, "in [0, 1] on MUSE's scale (0 = unknown)"),
    # MUSE's PrivLeak on these members (off in the MUSE presets, where the muse metric computes it on MUSE's sets)
    "privleak": Option(True, lambda v: isinstance(v, bool), "True or False"),
    # The GradNorm attack (one backward pass per chunk, so off by default): the norm of its per-tensor gradients.
    "gradnorm": Option("", lambda v: v in GRADNORM_ORDERS, f"one of {sorted(GRADNORM_ORDERS)} ('' = off)"),
}


def _rows(stats: dict, rows: np.ndarray) -> dict:
    return {k: v[rows] for k, v in stats.items() if k != "index"}


def scored_texts(tokenizer: Any, chunks: Chunks, idx: np.ndarray) -> list[str]:
    """The text zlib compresses: each chunk's scored tokens (a question-answer chunk's answer only) decoded without
    special tokens, as open-unlearning's ``extract_target_texts_from_processed_data`` does."""
    spans = zip(chunks.tokens[idx], chunks.prompts[idx], chunks.lengths[idx])
    return [tokenizer.decode(t[start:length], skip_special_tokens=True) for t, start, length in spans]


def _scores(ctx: EvalContext, split: str, n: int, options: Mapping[str, Any], reference: Any) -> dict:
    stats = ctx.stats(split)
    rows = subset(len(stats["logprob"]), n)  # balance the two sides, spanning both
    chunks, idx = ctx.splits[split], stats["index"][rows]
    texts = scored_texts(ctx.tokenizer, chunks, idx)
    ref = _rows(ctx.stats(split, *reference), rows) if reference else None
    ks = tuple(float(k) for k in options["ks"])
    scores = M.mia_scores(_rows(stats, rows), texts, ref, ks)
    if options["gradnorm"]:  # members have smaller gradients: minus the norm, so that higher means member
        p = GRADNORM_ORDERS[options["gradnorm"]]
        norms = ctx.evaluator.gradient_norms(ctx.params, chunks.tokens[idx], chunks.mask[idx], p, chunks.prompts[idx])
        scores["gradnorm"] = -norms
    return scores


def membership(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """Every attack's summary (``{attack: {auc, auc_folded, tpr@1%fpr, tpr@5%fpr}}``), the pair counts, and the
    raw scores as artifacts (for roc.png). Nothing without both the forget and the approximate split."""
    if MEMBERS not in ctx.splits or NONMEMBERS not in ctx.splits:
        return None
    reference = ctx.load_model(options["reference_model"]) if options["reference_model"] else None
    n = min(len(ctx.stats(MEMBERS)["logprob"]), len(ctx.stats(NONMEMBERS)["logprob"]))
    scores = {split: _scores(ctx, split, n, options, reference) for split in (MEMBERS, NONMEMBERS)}
    summary = {name: M.attack_summary(scores[MEMBERS][name], scores[NONMEMBERS][name]) for name in scores[MEMBERS]}
    summary["_pairs"] = {"members": n, "nonmembers": n}
    summary[ARTIFACTS] = {s: {a: np.asarray(v).tolist() for a, v in d.items()} for s, d in scores.items()}
    return summary


def retrained_reference(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> tuple[float, str]:
    """The retrained model's Min-K% (k=0.4) AUC on MUSE's scale, and where it comes from: the given
    ``retrained_auc``, else the oracle's measured AUC (converted), else chance."""
    oracle = results.get("oracle", {}).get("mia", {}).get(PRIVLEAK_ATTACK, {}).get("auc")
    return M.retrained_reference(options["retrained_auc"], None if oracle is None else M.muse_auc(oracle))


def add_privleak(results: dict[str, dict[str, Any]], options: Mapping[str, Any]) -> None:
    """MUSE's PrivLeak of every model on MUSE's scale, against :func:`retrained_reference` (the one place PrivLeak
    is computed). Each model's ``privleak`` also records its own AUC and the reference on MUSE's scale."""
    reference, source = retrained_reference(results, options)
    for metrics in results.values():
        mia = metrics.get("mia")
        if mia and PRIVLEAK_ATTACK in mia and options["privleak"]:
            own = M.muse_auc(mia[PRIVLEAK_ATTACK]["auc"])
            mia["privleak"] = {
                PRIVLEAK_ATTACK: M.privacy_leakage(own, reference),
                "muse_auc": own,
                "retrained_muse_auc": reference,
                "retrained_from": source,
            }


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    pairs = next(iter(results.values())).get("_pairs", {})
    fields = [("auc", "AUC"), ("tpr@1%fpr", "TPR@1%FPR"), ("tpr@5%fpr", "TPR@5%FPR")]
    lines = [
        "## Membership inference (forget = members, approximate = non-members)",
        "",
        f"{pairs.get('members', '?')} member and {pairs.get('nonmembers', '?')} non-member chunks. AUC near "
        "0.5 means the forget set looks like unseen data; report.json also has `auc_folded` = max(AUC, "
        "1 - AUC), as the official code reports.",
        "",
        *table(results, "attack", fields, 3, skip=("privleak",)),
    ]
    leak = {n: r["privleak"] for n, r in results.items() if r.get("privleak")}
    if leak:
        first = next(iter(leak.values()))
        against = {**M.RETRAINED_FROM, "given": "evaluation.mia.retrained_auc"}[first["retrained_from"]]
        lines += [
            "PrivLeak (MUSE's C3, Min-K% k=0.4): (AUC - AUC_retrained) / AUC_retrained x 100 with both AUCs on "
            "MUSE's scale, where the forget set is the non-member side (MUSE AUC = 1 - the AUC above); "
            f"AUC_retrained {fmt(first['retrained_muse_auc'], 4)} ({against}). Negative: the forget set still "
            "looks familiar; positive: over-unlearned.",
            "",
            ", ".join(f"{n} {fmt(v[PRIVLEAK_ATTACK], 3)}" for n, v in leak.items()),
            "",
        ]
    return lines


def plot_roc(artifacts: Mapping[str, Mapping[str, Mapping[str, Any]]], directory: Path) -> Path | None:
    """``roc.png``: ROC curves of the key attacks, one panel per model (e.g. original / oracle / unlearned)."""
    panels = {name: s for name, s in artifacts.items() if s}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, scores) in zip(axes[0], panels.items()):
        for attack in KEY_ATTACKS:
            if attack not in scores[MEMBERS]:
                continue
            member, nonmember = np.asarray(scores[MEMBERS][attack]), np.asarray(scores[NONMEMBERS][attack])
            values = np.r_[member, nonmember]
            labels = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
            ok = np.isfinite(values)
            fpr, tpr = M.roc_curve(labels[ok], values[ok])
            ax.plot(fpr, tpr, label=f"{attack} ({M.auc(fpr, tpr):.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(name)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = directory / "roc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# version 2: zlib on the text without special tokens, Min-K%++'s variance floored at 1e-6 (open-unlearning's)
register_metric("mia", report=report, options=OPTIONS, finalize=add_privleak, plot=plot_roc, version=2)(membership)
