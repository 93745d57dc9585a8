"""The quantization attack (Zhang et al., ICLR 2025): each model's forget and unseen perplexity and Min-K% AUC
after its weights are quantized (int8, int4 round-to-nearest per channel, NF4), next to the full-precision
values, for the original, unlearned and oracle models alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxunlearn.attacks.quantize import SCHEMES, quantize_params
from jaxunlearn.common.settings import parse_list
from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.registry import EvalContext, Option, register_metric
from jaxunlearn.evaluation.tables import section

MEMBERS, NONMEMBERS, K = "forget", "approximate", 0.4
OPTIONS = {
    "schemes": Option(
        "", lambda v: all(s in SCHEMES for s in parse_list(v)), f"comma-separated from {SCHEMES} ('' = off)"
    ),
}


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    fields = [("forget_ppl", "forget ppl"), ("approximate_ppl", "approx ppl"), ("auc", "Min-K% AUC")]
    note = (
        "Weights quantized and dequantized (norms and biases kept), then measured again: forgetting that only "
        "lives below the quantization step comes back. `none`: full precision."
    )
    return section("Quantization attack", note, results, "weights", fields, 4)


def _measure(stats: Mapping[str, dict]) -> dict[str, float]:
    out = {f"{split}_ppl": M.perplexity_metrics(s)["ppl"] for split, s in stats.items()}
    if MEMBERS in stats and NONMEMBERS in stats:
        out["auc"] = M.paired_min_k_auc(stats[MEMBERS], stats[NONMEMBERS], K)
    return out


@register_metric("quantization", report=report, options=OPTIONS)
def quantization(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"none" | scheme: {forget_ppl, approximate_ppl, auc}}`` (nothing without schemes)."""
    schemes = parse_list(options["schemes"])
    splits = [s for s in (MEMBERS, NONMEMBERS) if s in ctx.splits]
    if not schemes or not splits:
        return None
    results = {"none": _measure({s: ctx.stats(s) for s in splits})}
    merged = ctx.evaluator.lm.merged(ctx.params)  # LoRA: the weights as the unlearned model has them
    for scheme in schemes:
        quantized = quantize_params(merged, ctx.evaluator.lm.config, scheme)
        results[scheme] = _measure({s: ctx.stats(s, ctx.evaluator, quantized) for s in splits})
    return results
