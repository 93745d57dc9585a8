"""The comparison as people read it: ``compare.md`` (one world's, or across worlds) and ``compare.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jaxunlearn.evaluation import tables

COLUMNS = (
    "variant",
    "lr",
    "steps",
    "forget_ppl",
    "approximate_ppl",
    "retain_ppl",
    "general_ppl",
    "auc",
    "loss_auc",
    "verbatim_rougeL",
    "forget_ppl_vs_reference",
    "auc_vs_reference",
    "kl_forget",
    "kl_retain",
    "retrain_over_unlearn",
    "score",
)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: :data:`COLUMNS`, then every attack column some row has, in first-seen order."""
    extra = [k for row in rows for k in row if k not in COLUMNS and k != "stopped" and not k.endswith("_change")]
    return list(COLUMNS) + list(dict.fromkeys(extra))


def _fmt(x: Any) -> str:
    """A table cell: :func:`jaxunlearn.evaluation.tables.fmt` (4 significant digits, ``-`` for None and NaN),
    yes/no for a flag."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return tables.fmt(x)


def _table_rows(rows, cols: list[str]) -> list[str]:
    return ["| " + " | ".join(_fmt(r.get(c, math.nan)) for c in cols) + " |" for r in rows]


def _attack_lines(result: dict) -> list[str]:
    """One line per reference model with its numbers under each attack (the baseline the columns compare to)."""
    lines = []
    for name, attacks in result.get("attacks", {}).items():
        if attacks:
            parts = [f"{a}: forget ppl {_fmt(m['forget_ppl'])}, AUC {_fmt(m['auc'])}" for a, m in attacks.items()]
            lines.append(f"{name.capitalize()} under the attacks: " + "; ".join(parts) + ".")
    return lines


def _model_line(ppl: dict[str, float], auc: float) -> str:
    """``forget ppl 62.06, approximate 109.7, ...; Min-K% (k=0.4) AUC 0.824`` for the splits the run has."""
    parts = [f"{split} {'ppl ' if split == 'forget' else ''}{ppl[split]:.4g}" for split in ppl]
    if auc is not None and not math.isnan(auc):
        return ", ".join(parts) + f"; Min-K% (k=0.4) AUC {auc:.3f}"
    return ", ".join(parts)


def markdown(result: dict, rows: list[dict], best_by_variant: dict, best: dict) -> str:
    """One world's ``compare.md``."""
    cols = columns(rows)
    header = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines = ["# Unlearning methods compared", ""]
    lines.append(f"Original model: {_model_line(result['original'], result['original_auc'])}.")
    if result["oracle"]:
        lines.append(
            f"Oracle (retrained without the forget set): {_model_line(result['oracle'], result['oracle_auc'])}."
        )
    lines += _attack_lines(result)
    lines += ["", "## Best learning rate per method (lower score = closer to the oracle)", "", *header]
    lines += _table_rows(sorted(best_by_variant.values(), key=lambda r: r["score"]), cols)
    lines += ["", f"Best: **{best['variant']}** at lr {best['lr']:.3g}.", "", "## Targets", ""]
    lines += ["| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {_fmt(t['met'])} |" for t in result["targets"]]
    lines += ["", "## Every run", "", *header, *_table_rows(rows, cols), "", "![comparison](compare.png)", ""]
    return "\n".join(lines)


def plot(path: Path, best: dict[str, dict], result: dict) -> None:
    """One world's ``compare.png``: each method at its best learning rate, against the oracle and the original."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(best)

    def level(model: str, split: str) -> float | None:
        value = (result[model] or {}).get(split)
        return None if value is None or math.isnan(value) else value

    def auc(model: str) -> float | None:
        value = result[f"{model}_auc"]
        return None if value is None or math.isnan(value) else value

    panels = [
        (f"{split}_ppl", f"{split} perplexity", level("oracle", split), level("original", split))
        for split in ("forget", "retain", "general")
    ]
    panels += [
        ("auc", "Min-K% (k=0.4) AUC", auc("oracle"), auc("original")),
        ("verbatim_rougeL", "verbatim ROUGE-L (forget)", None, None),
        ("kl_forget", "KL(oracle || model), forget", None, None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title, oracle, original) in zip(axes.ravel(), panels):
        ax.bar(range(len(names)), [best[n].get(key, math.nan) for n in names], color="tab:blue")
        if oracle is not None:
            ax.axhline(oracle, color="tab:green", linestyle="--", label="oracle")
        if original is not None:
            ax.axhline(original, color="tab:red", linestyle=":", label="original")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if oracle is not None or original is not None:
            ax.legend(fontsize=7)
    fig.suptitle("best learning rate of each method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_pm_sd(cell: dict[str, Any] | None) -> str:
    """``mean +- sd``, or the per-world values (``-`` = none) when some world has no number."""
    if cell is None:
        return "-"
    if "mean" in cell and not math.isnan(cell["mean"]):
        return f"{_fmt(cell['mean'])} ± {cell['sd']:.2g}"
    return "/".join(_fmt(v) for v in cell["values"])


def worlds_markdown(result: dict[str, Any]) -> str:
    """The top-level ``compare.md`` of a comparison across worlds (:func:`~.worlds.across_worlds`' result)."""
    seeds = result["world_seeds"]
    methods = result["methods"]
    cols = [c for c in columns([{k: 0 for k in m} for m in methods]) if c not in ("variant", "lr", "wins")]
    cols = [c for c in cols if any(c in m for m in methods)]
    lines = [f"# Unlearning methods compared on {len(seeds)} built-in worlds (seeds {', '.join(map(str, seeds))})", ""]
    lines += [
        "| world seed | original forget ppl | approximate ppl | oracle forget ppl | original Min-K% AUC | "
        "oracle Min-K% AUC | best method |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        w = result["worlds"][seed]
        oracle = w["oracle"] or {}
        cells = [w["original"]["forget"], w["original"]["approximate"], oracle.get("forget"), w["original_auc"]]
        cells += [w["oracle_auc"], f"{w['best']['variant']} (lr {w['best']['lr']:.3g})"]
        lines.append(f"| {seed} | " + " | ".join(_fmt(c) for c in cells) + " |")
    for seed in seeds:
        attack_lines = _attack_lines(result["worlds"][seed])
        lines += [f"World {seed}: {line}" for line in attack_lines]
    lines += [
        "",
        "## Each method at one learning rate (mean ± sd over the worlds; lower score = closer to the oracle)",
        "",
        "Each method's learning rate is the one with the lowest mean score; *wins*: on how many worlds it has the "
        "lowest score of all methods.",
        "",
        "| " + " | ".join(["variant", "lr", "wins", *cols]) + " |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for m in methods:
        lines.append(
            "| "
            + " | ".join(
                [m["variant"], f"{m['lr']:.3g}", f"{m['wins']}/{len(seeds)}"] + [_mean_pm_sd(m.get(c)) for c in cols]
            )
            + " |"
        )
    best = result["best"]
    lines += [
        "",
        f"Best: **{best['variant']}** at lr {best['lr']:.3g}.",
        "",
        "## Targets on every world (best method)",
        "",
    ]
    lines += [
        "| target | " + " | ".join(f"seed {s}" for s in seeds) + " | every world |",
        "|" + "---|" * (len(seeds) + 2),
    ]
    for i, first in enumerate(result["targets"][seeds[0]]):
        per_seed = [result["targets"][s][i] for s in seeds]
        cells = [f"{t['value']} ({_fmt(t['met'])})" for t in per_seed]
        lines.append(f"| {first['target']} | " + " | ".join(cells) + f" | {_fmt(all(t['met'] for t in per_seed))} |")
    lines += ["", "Each world's own comparison: " + ", ".join(f"[seed {s}](seed-{s}/compare.md)" for s in seeds), ""]
    return "\n".join(lines)
