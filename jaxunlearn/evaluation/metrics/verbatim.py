"""Verbatim memorisation: greedy, KV-cached continuation of forget-chunk prefixes against the true text, with
the approximate (unseen) split as the baseline level."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.registry import EvalContext, Option, register_metric
from jaxunlearn.evaluation.tables import table
from jaxunlearn.models.generation import generate

SPLITS = ("forget", "approximate")

OPTIONS = {
    "prompt_tokens": Option(32, lambda v: v >= 1, ">= 1"),
    "new_tokens": Option(64, lambda v: v >= 0, ">= 0"),
    "max_chunks": Option(100, lambda v: v >= 0, ">= 0 (0 = off)"),
}


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    fields = [("exact_match", "exact"), ("rougeL_f1", "ROUGE-L F1"), ("token_match", "token match")]
    return [
        "## Verbatim memorisation (greedy continuation of chunk prefixes)",
        "",
        f"The first {options['prompt_tokens']} tokens of up to {options['max_chunks']} chunks per split, continued "
        f"for {options['new_tokens']} tokens.",
        "",
        *table(results, "split", fields, 3),
    ]


@register_metric("verbatim", report=report, options=OPTIONS)
def verbatim(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{split: {exact_match, token_match, rougeL_f1, rougeL_recall, n}}`` for the forget and approximate splits
    (``{"n": 0}`` when no chunk is long enough for prompt + continuation)."""
    p, n = options["prompt_tokens"], options["new_tokens"]
    out = {}
    for split in SPLITS:
        if split not in ctx.splits or not options["max_chunks"]:
            continue
        chunks = ctx.splits[split]
        idx = np.nonzero(chunks.lengths >= p + n)[0][: options["max_chunks"]]
        if not len(idx):
            out[split] = {"n": 0}
            continue
        generated = generate(
            ctx.evaluator.lm,
            ctx.params,
            chunks.tokens[idx, :p],
            max_new_tokens=n,
            mesh=ctx.evaluator.mesh,
            batch_size=ctx.evaluator.batch_size,
            rules=ctx.evaluator.rules,
        )
        out[split] = M.verbatim_metrics(
            generated, chunks.tokens[idx, p : p + n], lambda ids: ctx.tokenizer.decode(ids.tolist())
        )
    return out or None
