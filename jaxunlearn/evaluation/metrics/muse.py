"""MUSE's memorisation and utility criteria (Shi et al. 2024, arXiv 2407.06460), as its reference code computes them.

On the MUSE data set (``muse-bench/MUSE-News`` or ``MUSE-Books``, or a local copy laid out like it):

* **VerbMem** (C1, no verbatim memorisation): the greedy continuation of each ``verbmem`` prompt (``prompt``
  column, ``verbmem_new_tokens`` new tokens) against the true continuation (``gt``);
* **KnowMem** on the forget set (C2, no knowledge memorisation) and on the retain set (C4, utility preservation):
  each question answered greedily (``knowmem_new_tokens``) after the split's in-context examples, as
  ``Question: q\\nAnswer: a\\n\\n`` blocks followed by ``Question: q\\nAnswer: ``; the answer is cut before the first
  ``\\n\\n``, ``\\nQuestion`` or ``Question:``.

Each is the mean ROUGE-L F1 (rouge-score, no stemming: MUSE's ``mean_rougeL``), with the recall alongside.

* **PrivLeak** (C3, no privacy leakage), as ``metrics/privleak.py`` and ``eval.py``: every text of
  ``privleak/forget`` and ``privleak/holdout`` scored whole (the tokenizer's special tokens added, as
  ``tokenizer.encode``; cut at ``privleak_max_tokens``), Min-K% (k=0.4) over its tokens' log-probs, the AUC with
  the *holdout* texts as the positive class (MUSE's scale, ``forget_holdout_Min-40%``), then
  ``(AUC - AUC_retrained) / AUC_retrained x 100`` against ``retrained_auc`` (MUSE's ``constants.py``: news 0.4772,
  books 0.5393), else the oracle's AUC measured the same way, else 0.5 (open-unlearning's default).

Scalability and sustainability (C5, C6) are runs over growing or successive forget sets:
``python -m jaxunlearn.commands.muse``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxunlearn.data.documents import load_records
from jaxunlearn.data.source import DocumentSource
from jaxunlearn.evaluation import statistics as stats
from jaxunlearn.evaluation.registry import EvalContext, Option, register_metric
from jaxunlearn.evaluation.tables import fmt

STOP = ("\n\n", "\nQuestion", "Question:")  # MUSE's knowmem stops its answers at these


def _split_spec(value: str) -> bool:
    return value.count(":") == 1 and all(value.split(":"))


SPEC = "CONFIG:SPLIT of the data set"
OPTIONS = {
    "path": Option("", None, "the MUSE data set (muse-bench/MUSE-News, MUSE-Books or a local copy; '' = off)"),
    "verbmem": Option("verbmem:forget", _split_spec, SPEC),
    "knowmem_forget": Option("knowmem:forget_qa", _split_spec, SPEC),
    "knowmem_forget_icl": Option("knowmem:forget_qa_icl", _split_spec, SPEC),
    "knowmem_retain": Option("knowmem:retain_qa", _split_spec, SPEC),
    "knowmem_retain_icl": Option("knowmem:retain_qa_icl", _split_spec, SPEC),
    "privleak_forget": Option("privleak:forget", _split_spec, SPEC),
    "privleak_holdout": Option("privleak:holdout", _split_spec, SPEC),
    # MUSE scores each text whole; longer texts than this are cut (0 = the model's max_position_embeddings).
    "privleak_max_tokens": Option(0, lambda v: v >= 0, ">= 0 (0 = the model's context length)"),
    # MUSE's published AUC of its retrained model, on MUSE's scale (news 0.4772, books 0.5393); 0 = the oracle's.
    "retrained_auc": Option(0.0, lambda v: 0 <= v <= 1, "in [0, 1] on MUSE's scale (0 = the oracle's, else 0.5)"),
    "verbmem_new_tokens": Option(128, lambda v: v >= 1, ">= 1"),
    "knowmem_new_tokens": Option(32, lambda v: v >= 1, ">= 1"),
    "max_items": Option(0, lambda v: v >= 0, ">= 0 (0 = all)"),
}


def load(options: Mapping[str, Any], key: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The records of the ``CONFIG:SPLIT`` that option ``key`` names."""
    name, split = options[key].split(":")
    records = load_records(DocumentSource(label=f"muse.{key}", path=options["path"], name=name, split=split), columns)
    return records[: options["max_items"]] if options["max_items"] and not key.endswith("_icl") else records


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L F1 and recall, as MUSE scores (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"] for pred, ref in zip(predictions, references)]
    return {
        "rougeL_f1": float(np.mean([s.fmeasure for s in scores])),
        "rougeL_recall": float(np.mean([s.recall for s in scores])),
        "n": len(scores),
    }


def encode(ctx: EvalContext, text: str) -> list[int]:
    return list(ctx.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def verbmem_reference(ctx: EvalContext, text: str, new_tokens: int) -> str:
    """The true continuation as MUSE scores it (``metrics/verbmem.py``): its first ``new_tokens`` tokens, counted
    with the special tokens the tokenizer adds (a Llama BOS takes one), decoded without them."""
    ids = encode(ctx, text)[:new_tokens]
    return ctx.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def verbatim_memorisation(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, float]:
    """C1: ROUGE-L of the greedy continuation of each prompt against the first ``verbmem_new_tokens`` tokens of
    its true continuation (MUSE's cut: the model generates that many, so the rest could never be matched)."""
    records = load(options, "verbmem", ["prompt", "gt"])
    new_tokens = options["verbmem_new_tokens"]
    outputs = ctx.generate_text([encode(ctx, r["prompt"]) for r in records], new_tokens)
    return rouge_l(outputs, [verbmem_reference(ctx, r["gt"], new_tokens) for r in records])


def icl_prompt(examples: Sequence[Mapping[str, str]]) -> str:
    """MUSE's few-shot prefix: every example as ``Question: q\\nAnswer: a\\n\\n``."""
    return "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)


def knowledge_memorisation(ctx: EvalContext, options: Mapping[str, Any], side: str) -> dict[str, float]:
    """C2 (``forget``) or C4 (``retain``): ROUGE-L of the few-shot greedy answers against the true answers."""
    qa = load(options, f"knowmem_{side}", ["question", "answer"])
    prefix = icl_prompt(load(options, f"knowmem_{side}_icl", ["question", "answer"]))
    prompts = [encode(ctx, f"{prefix}Question: {r['question']}\nAnswer: ") for r in qa]
    outputs = ctx.generate_text(prompts, options["knowmem_new_tokens"], stop=STOP)
    return rouge_l(outputs, [r["answer"] for r in qa])


PRIVLEAK_K = 0.4  # MUSE's privleak_auc_key: forget_holdout_Min-40%


def privleak_scores(ctx: EvalContext, options: Mapping[str, Any], key: str) -> tuple[np.ndarray, int]:
    """Min-K% (k=0.4) of each text of the split option ``key`` names, scored whole (MUSE's ``inference``), and how
    many texts were cut at ``privleak_max_tokens``."""
    limit = options["privleak_max_tokens"] or ctx.evaluator.lm.config.max_position_embeddings
    ids = [encode(ctx, r["text"]) for r in load(options, key, ["text"])]
    cut = sum(len(x) > limit for x in ids)
    ids = [x[:limit] for x in ids if len(x) >= 2]  # one token has nothing to score
    logprobs = ctx.evaluator.sequence_logprobs(ctx.params, ids, desc=f"privleak {key}")
    return stats.min_k_score(logprobs, PRIVLEAK_K), cut


def privacy_leakage(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
    """C3's AUC on MUSE's scale: the holdout texts are the positive class, so a model that still knows the forget
    set scores below 0.5 (:func:`add_privleak` turns it into PrivLeak once the retrained model's is known)."""
    forget, cut_forget = privleak_scores(ctx, options, "privleak_forget")
    holdout, cut_holdout = privleak_scores(ctx, options, "privleak_holdout")
    return {
        "muse_auc": stats.attack_summary(holdout, forget)["auc"],
        "forget": len(forget),
        "holdout": len(holdout),
        "truncated": cut_forget + cut_holdout,
    }


def muse(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{verbmem_forget, knowmem_forget, knowmem_retain: {rougeL_f1, rougeL_recall, n}, privleak: {muse_auc,
    ...}}`` (nothing without ``path``)."""
    if not options["path"]:
        return None
    return {
        "verbmem_forget": verbatim_memorisation(ctx, options),
        "knowmem_forget": knowledge_memorisation(ctx, options, "forget"),
        "knowmem_retain": knowledge_memorisation(ctx, options, "retain"),
        "privleak": privacy_leakage(ctx, options),
    }


def add_privleak(results: dict[str, dict[str, Any]], options: Mapping[str, Any]) -> None:
    """Each model's PrivLeak (%) against the retrained model's AUC: ``retrained_auc``, else the oracle's, else 0.5."""
    oracle = results.get("oracle", {}).get("muse", {}).get("privleak", {}).get("muse_auc")
    reference, source = stats.retrained_reference(options["retrained_auc"], oracle)
    for metrics in results.values():
        leak = metrics.get("muse", {}).get("privleak")
        if leak:
            leak.update(
                privleak=stats.privacy_leakage(leak["muse_auc"], reference),
                retrained_muse_auc=reference,
                retrained_from=source,
            )


ROWS = (
    ("verbmem_forget", "C1 VerbMem on the forget set (lower = less verbatim memorisation)"),
    ("knowmem_forget", "C2 KnowMem on the forget set (lower = less knowledge memorisation)"),
    ("knowmem_retain", "C4 KnowMem on the retain set (utility: higher is better)"),
)
PRIVLEAK_ROW = "C3 PrivLeak % (0 = like the retrained model; negative = the forget set still looks familiar)"


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    names = list(results)
    lines = [
        "## MUSE",
        "",
        "ROUGE-L F1 x 100 (MUSE's scale). Scalability and sustainability: `python -m jaxunlearn.commands.muse`.",
        "",
        "| criterion | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for key, title in ROWS:
        cells = [fmt(100 * results[n][key]["rougeL_f1"], 4) if key in results[n] else "-" for n in names]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    leaks = {n: r["privleak"] for n, r in results.items() if "privleak" in r.get("privleak", {})}
    if leaks:
        lines.append(
            f"| {PRIVLEAK_ROW} | "
            + " | ".join(fmt(leaks[n]["privleak"], 4) if n in leaks else "-" for n in names)
            + " |"
        )
        first = next(iter(leaks.values()))
        source = {**stats.RETRAINED_FROM, "given": "evaluation.muse.retrained_auc"}[first["retrained_from"]]
        lines += [
            "",
            f"PrivLeak: Min-K% (k=0.4) AUC on MUSE's scale (holdout texts positive) over {first['forget']} forget and "
            f"{first['holdout']} holdout texts, each whole; AUC: "
            + ", ".join(f"{n} {fmt(v['muse_auc'], 4)}" for n, v in leaks.items())
            + f"; retrained {fmt(first['retrained_muse_auc'], 4)} ({source}).",
        ]
        if first["truncated"]:
            lines.append(f"{first['truncated']} texts longer than evaluation.muse.privleak_max_tokens were cut.")
    return lines + [""]


# version 3: PrivLeak on MUSE's privleak sets (version 2: VerbMem against the first verbmem_new_tokens tokens)
register_metric("muse", report=report, options=OPTIONS, finalize=add_privleak, version=3)(muse)
