"""Everything measured for one set of parameters: perplexity per split, membership inference, verbatim
memorisation and multiple-choice tasks, all through :class:`~jaxunlearn.evaluation.loop.Evaluator`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxunlearn.data.chunks import Chunks
from jaxunlearn.evaluation import metrics as M
from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.tasks import load_task, score_task
from jaxunlearn.generation import generate

MEMBERS, NONMEMBERS = "forget", "approximate"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    max_chunks: int = 0  # per split; 0 = all
    mia_ks: tuple[float, ...] = M.MIA_KS
    verbatim_prompt_tokens: int = 32
    verbatim_new_tokens: int = 64
    verbatim_max_chunks: int = 100
    tasks: tuple[str, ...] = ()
    task_max_items: int = 0
    task_max_length: int = 2048
    retrained_auc: float = 0.0  # Min-K% (k=0.4) AUC of a retrained model, for MUSE's PrivLeak

    @classmethod
    def from_config(cls, ev: Mapping[str, Any], max_length: int) -> EvalOptions:
        return cls(
            max_chunks=ev["max_chunks"],
            mia_ks=tuple(float(k) for k in ev["mia_ks"]),
            verbatim_prompt_tokens=ev["verbatim_prompt_tokens"],
            verbatim_new_tokens=ev["verbatim_new_tokens"],
            verbatim_max_chunks=ev["verbatim_max_chunks"],
            tasks=tuple(t for t in ev["tasks"] if t),
            task_max_items=ev["task_max_items"],
            task_max_length=max_length,
            retrained_auc=ev["retrained_auc"],
        )


def subset(n: int, limit: int) -> np.ndarray:
    """``limit`` evenly spaced indices out of ``n`` (all when ``limit`` is 0 or large): a cap that still spans
    every document, unlike the first ``limit`` chunks, which come from a handful of documents."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def split_stats(evaluator: Evaluator, params: dict, splits: Mapping[str, Chunks], limit: int) -> dict[str, dict]:
    """Evaluation-loop statistics of every split (the first ``limit`` chunks of each)."""
    out = {}
    for name, chunks in splits.items():
        idx = subset(len(chunks), limit)
        out[name] = evaluator.token_stats(params, chunks.tokens[idx], chunks.mask[idx], desc=f"eval {name}")
        out[name]["index"] = idx
    return out


def perplexities(stats: Mapping[str, dict]) -> dict[str, dict[str, float]]:
    return {name: M.perplexity_metrics(s) for name, s in stats.items()}


def _rows(stats: dict, rows: np.ndarray) -> dict:
    return {k: v[rows] for k, v in stats.items() if k != "index"}


def membership_inference(
    stats: Mapping[str, dict],
    tokenizer: Any,
    splits: Mapping[str, Chunks],
    options: EvalOptions,
    ref_stats: Mapping[str, dict] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """Forget chunks (members) against as many approximate chunks (non-members), as the paper does.

    Returns the per-attack summary and the raw scores (for ROC plots).
    """
    if MEMBERS not in stats or NONMEMBERS not in stats:
        return {}, {}
    n = min(len(stats[MEMBERS]["logprob"]), len(stats[NONMEMBERS]["logprob"]))
    scores = {}
    for split in (MEMBERS, NONMEMBERS):
        rows = subset(len(stats[split]["logprob"]), n)  # balance the two sides, spanning both
        chunks, idx = splits[split], stats[split]["index"][rows]
        texts = [tokenizer.decode(t[:length]) for t, length in zip(chunks.tokens[idx], chunks.lengths[idx])]
        ref = _rows(ref_stats[split], rows) if ref_stats else None
        scores[split] = M.mia_scores(_rows(stats[split], rows), texts, ref, options.mia_ks)
    summary = {name: M.attack_summary(scores[MEMBERS][name], scores[NONMEMBERS][name]) for name in scores[MEMBERS]}
    summary["_pairs"] = {"members": n, "nonmembers": n}
    if options.retrained_auc:
        summary["privleak"] = {"min_k_0.4": M.privacy_leakage(summary["min_k_0.4"]["auc"], options.retrained_auc)}
    return summary, scores


def verbatim(
    evaluator: Evaluator, params: dict, tokenizer: Any, splits: Mapping[str, Chunks], options: EvalOptions
) -> dict[str, dict[str, float]]:
    """Greedy continuation of the first P tokens of long-enough chunks vs the true next N tokens."""
    p, n = options.verbatim_prompt_tokens, options.verbatim_new_tokens
    out = {}
    for split in (MEMBERS, NONMEMBERS):
        if split not in splits or not options.verbatim_max_chunks:
            continue
        chunks = splits[split]
        idx = np.nonzero(chunks.lengths >= p + n)[0][: options.verbatim_max_chunks]
        if not len(idx):
            out[split] = {"n": 0}  # no chunk is long enough for prompt + continuation
            continue
        prompts, truth = chunks.tokens[idx, :p], chunks.tokens[idx, p : p + n]
        generated = generate(
            evaluator.lm,
            params,
            prompts,
            max_new_tokens=n,
            mesh=evaluator.mesh,
            batch_size=evaluator.batch_size,
            rules=evaluator.rules,
        )
        out[split] = M.verbatim_metrics(generated, truth, lambda ids: tokenizer.decode(ids.tolist()))
    return out


def benchmark_tasks(evaluator: Evaluator, params: dict, tokenizer: Any, options: EvalOptions) -> dict[str, dict]:
    results = {}
    for spec in options.tasks:
        name, items = load_task(spec, options.task_max_items)

        def score_pairs(pairs, name=name):
            return evaluator.score_continuations(params, pairs, options.task_max_length, desc=f"task {name}")

        results[name] = score_task(score_pairs, tokenizer, items)
    return results


def evaluate_model(
    evaluator: Evaluator,
    params: dict,
    tokenizer: Any,
    splits: Mapping[str, Chunks],
    options: EvalOptions,
    *,
    reference: tuple[Evaluator, dict] | None = None,
    parts: Sequence[str] = ("perplexity", "mia", "verbatim", "tasks"),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, mia_scores)`` for one set of parameters."""
    stats = split_stats(evaluator, params, splits, options.max_chunks)
    result: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    if "perplexity" in parts:
        result["perplexity"] = perplexities(stats)
    if "mia" in parts:
        ref_stats = None
        if reference is not None:
            ref_eval, ref_params = reference
            wanted = {k: v for k, v in splits.items() if k in (MEMBERS, NONMEMBERS)}
            ref_stats = split_stats(ref_eval, ref_params, wanted, options.max_chunks)
        result["mia"], scores = membership_inference(stats, tokenizer, splits, options, ref_stats)
    if "verbatim" in parts:
        result["verbatim"] = verbatim(evaluator, params, tokenizer, splits, options)
    if "tasks" in parts and options.tasks:
        result["tasks"] = benchmark_tasks(evaluator, params, tokenizer, options)
    return result, scores
