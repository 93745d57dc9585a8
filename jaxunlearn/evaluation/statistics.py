"""Metrics computed on the host from the evaluation loop's per-token statistics.

Membership-inference scores are oriented so that *higher means "more likely a member"* (seen in training).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import numpy as np

MIA_KS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0)


def subset(n: int, limit: int) -> np.ndarray:
    """``limit`` evenly spaced indices out of ``n`` (all when ``limit`` is 0 or large): a cap that still spans
    every document, unlike the first ``limit`` chunks, which come from a handful of documents."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


# --- perplexity and accuracy -------------------------------------------------------------------------------


def perplexity_metrics(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """Perplexity and next-token accuracy of a split.

    ``ppl`` is the official definition: ``exp`` of the mean over chunks of each chunk's mean NLL (every chunk
    weighs the same); ``ppl_token`` weighs every token the same: ``exp(total NLL / total tokens)``. ``acc`` and
    ``acc_token`` are the matching averages of "the true next token was the argmax".
    """
    mask = stats["target_mask"].astype(bool)
    counts = mask.sum(axis=1)
    keep = counts > 0
    nll = -np.where(mask, stats["logprob"], 0.0).astype(np.float64)
    hits = np.where(mask, stats["is_argmax"], False)
    chunk_nll = nll.sum(1)[keep] / counts[keep]
    chunk_acc = hits.sum(1)[keep] / counts[keep]
    total = counts.sum()
    return {
        "ppl": float(np.exp(chunk_nll.mean())) if keep.any() else math.nan,
        "ppl_token": float(np.exp(nll.sum() / total)) if total else math.nan,
        "nll": float(chunk_nll.mean()) if keep.any() else math.nan,
        "acc": float(chunk_acc.mean()) if keep.any() else math.nan,
        "acc_token": float(hits.sum() / total) if total else math.nan,
        "chunks": int(keep.sum()),
        "tokens": int(total),
    }


# --- memorisation (teacher-forced, from "the true next token was the argmax") --------------------------------


def extraction_strength(hits: np.ndarray) -> float:
    """Extraction strength of one chunk (Carlini et al. 2021; open-unlearning's teacher-forced form) from its
    ``n`` valid positions' argmax hits: ``1 - k/n`` for the smallest ``k`` such that every prediction from
    position ``k`` on is the true token, with ``k`` at most ``n - 1``: open-unlearning's loop
    (``memorization.py``) ends at ``k = n - 1`` whether or not the last prediction is right, so a chunk whose last
    prediction is wrong scores ``1/n``."""
    n = len(hits)
    if not n:
        return math.nan
    wrong = np.flatnonzero(~np.asarray(hits, bool))
    k = int(wrong[-1]) + 1 if len(wrong) else 0  # the shortest prefix after which the suffix is all hits
    return 1.0 - min(k, n - 1) / n


def memorization_metrics(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """Exact memorisation (Tirumala et al. 2022: the fraction of a chunk's next tokens that are the argmax,
    averaged over chunks; the ``acc`` of :func:`perplexity_metrics`) and mean extraction strength of a split."""
    rows = [hits for hits in valid_rows(stats["is_argmax"], stats["target_mask"]) if len(hits)]
    return {
        "exact_memorization": float(np.mean([h.mean() for h in rows])) if rows else math.nan,
        "extraction_strength": float(np.mean([extraction_strength(h) for h in rows])) if rows else math.nan,
        "chunks": len(rows),
    }


# --- membership-inference scores (one per chunk) -------------------------------------------------------------


def valid_rows(values: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Each row's values at its ``mask``ed positions."""
    return [row[m] for row, m in zip(values, mask.astype(bool))]


def loss_score(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """LOSS attack (Yeom et al.): the mean token log-likelihood."""
    return np.asarray([float(np.mean(x)) if len(x) else math.nan for x in logprobs])


def min_k_score(logprobs: Sequence[np.ndarray], k: float) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2023): the mean of the ``floor(k n)`` (at least 1) lowest token log-probs."""
    out = []
    for x in logprobs:
        if not len(x):
            out.append(math.nan)
            continue
        n = max(1, int(len(x) * k))
        out.append(float(np.mean(np.sort(x)[:n])))
    return np.asarray(out)


def min_k_plus_plus_score(
    logprobs: Sequence[np.ndarray], means: Sequence[np.ndarray], stds: Sequence[np.ndarray], k: float
) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024): Min-K% over ``(log p(x_t) - mu_t) / sigma_t``, where ``mu_t``/``sigma_t`` are
    the mean and standard deviation of ``log p(z)`` for ``z ~ p(. | x_<t)``."""
    # open-unlearning's min_k_plus_plus.py floors the variance at 1e-6: the standard deviation at 1e-3
    z = [(x - mu) / np.maximum(sd, 1e-3) for x, mu, sd in zip(logprobs, means, stds)]
    return min_k_score(z, k)


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(logprobs: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """zlib ratio (Carlini et al. 2021): ``-(mean NLL) / zlib entropy``; memorised text has a low loss for
    how incompressible it is."""
    return np.asarray([float(np.mean(x)) / max(zlib_entropy(t), 1) for x, t in zip(logprobs, texts)])


def reference_score(logprobs: Sequence[np.ndarray], ref_logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Reference-model attack: target log-likelihood minus the reference model's (a log likelihood ratio)."""
    return loss_score(logprobs) - loss_score(ref_logprobs)


def mia_scores(
    stats: dict[str, np.ndarray],
    texts: Sequence[str] | None = None,
    ref_stats: dict[str, np.ndarray] | None = None,
    ks: Sequence[float] = MIA_KS,
) -> dict[str, np.ndarray]:
    """Every attack's per-chunk score from evaluation-loop statistics."""
    mask = stats["target_mask"]
    logprobs = valid_rows(stats["logprob"], mask)
    means, stds = valid_rows(stats["mean"], mask), valid_rows(stats["std"], mask)
    scores = {"loss": loss_score(logprobs)}
    if texts is not None:
        scores["zlib"] = zlib_score(logprobs, texts)
    for k in ks:
        scores[f"min_k_{k:g}"] = min_k_score(logprobs, k)
        scores[f"min_k++_{k:g}"] = min_k_plus_plus_score(logprobs, means, stds, k)
    if ref_stats is not None:
        scores["reference"] = reference_score(logprobs, valid_rows(ref_stats["logprob"], ref_stats["target_mask"]))
    return scores


# --- ROC ---------------------------------------------------------------------------------------------------


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False/true positive rates at every distinct threshold (descending), starting at (0, 0). Label 1 = member."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(labels.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~labels).sum(), 1)]
    return fpr, tpr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC curve (trapezoid rule)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The highest true positive rate reachable with a false positive rate of at most ``max_fpr``."""
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def attack_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    """AUC (raw and folded to >= 0.5 as the official code reports it), TPR at 1% and 5% FPR."""
    scores = np.r_[member_scores, nonmember_scores]
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    ok = np.isfinite(scores)
    fpr, tpr = roc_curve(labels[ok], scores[ok])
    a = auc(fpr, tpr)
    return {
        "auc": a,
        "auc_folded": max(a, 1 - a),
        "tpr@1%fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr@5%fpr": tpr_at_fpr(fpr, tpr, 0.05),
    }


def paired_min_k_auc(members: dict[str, np.ndarray], nonmembers: dict[str, np.ndarray], k: float = 0.4) -> float:
    """Min-K% AUC of members against non-members from the evaluation loop's statistics (``logprob``,
    ``target_mask``), on as many chunks of each side (evenly spaced on the larger one), as the ``mia`` metric pairs
    them."""
    n = min(len(members["logprob"]), len(nonmembers["logprob"]))
    scores = []
    for stats in (members, nonmembers):
        rows = subset(len(stats["logprob"]), n)
        scores.append(min_k_score(valid_rows(stats["logprob"][rows], stats["target_mask"][rows]), k))
    return attack_summary(*scores)["auc"]


def muse_auc(auc_value: float) -> float:
    """An AUC with the forget set as members (this module's scale) on MUSE's scale, which treats the forget set as
    the *non-member* side (``eval_privleak``'s ``forget_holdout`` key in muse_bench ``metrics/privleak.py``):
    ``1 - auc``, exactly, ties included."""
    return 1.0 - auc_value


def privacy_leakage(auc_unlearned: float, auc_retrained: float) -> float:
    """MUSE's PrivLeak, both AUCs on MUSE's scale (:func:`muse_auc`): ``(AUC_unlearned - AUC_retrained) /
    AUC_retrained x 100`` (muse_bench ``eval.py``). 0 = like a retrained model; large negative = the forget set
    still looks like members (under-unlearned); large positive = it looks less familiar than unseen text
    (over-unlearned)."""
    return (auc_unlearned - auc_retrained) / auc_retrained * 100.0


# With no retrained model to compare with, PrivLeak is against a chance-level one, as open-unlearning's privleak
# defaults its reference AUC to 0.5.
CHANCE_AUC = 0.5


def retrained_reference(given: float, oracle: float | None) -> tuple[float, str]:
    """The retrained model's AUC for PrivLeak (MUSE's scale) and where it comes from: ``given`` when non-zero (a
    published value, e.g. MUSE's ``constants.py``), else the oracle's measured one, else chance (0.5)."""
    if given:
        return float(given), "given"
    if oracle is not None:
        return float(oracle), "oracle"
    return CHANCE_AUC, "chance"


# Where a PrivLeak's retrained AUC came from, in words for report.md.
RETRAINED_FROM = {"given": "given", "oracle": "the oracle's", "chance": "no retrained model: 0.5, as open-unlearning"}


# --- verbatim memorisation ----------------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words, as the ``rouge-score`` package tokenises (without stemming)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 over :func:`rouge_tokens` (longest common subsequence)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = _lcs(p, r)
    precision = lcs / len(p) if p else 0.0
    recall = lcs / len(r) if r else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def verbatim_metrics(generated: np.ndarray, truth: np.ndarray, decode) -> dict[str, float]:
    """Exact-match rate of whole continuations, mean fraction of matching tokens, mean ROUGE-L F1/recall."""
    if len(truth) == 0:
        return {"n": 0}
    rouge = [rouge_l(decode(g), decode(t)) for g, t in zip(generated, truth)]
    return {
        "exact_match": float(np.mean(np.all(generated == truth, axis=1))),
        "token_match": float(np.mean(generated == truth)),
        "rougeL_f1": float(np.mean([r["f1"] for r in rouge])),
        "rougeL_recall": float(np.mean([r["recall"] for r in rouge])),
        "n": int(len(truth)),
    }
