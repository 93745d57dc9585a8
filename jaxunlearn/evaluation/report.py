"""``report.json`` + ``report.md`` + PNG plots for a run (before/after unlearning) or a single model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxunlearn.evaluation import metrics as M
from jaxunlearn.run_record import write_json

KEY_ATTACKS = ("loss", "zlib", "min_k_0.2", "min_k_0.4", "min_k++_0.2", "reference")


def _change(before: Any, after: Any) -> Any:
    """``after - before`` for every number present in both (recursively)."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out = {k: _change(before[k], after[k]) for k in before if k in after}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and not isinstance(before, bool):
        return after - before
    return None


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _table(models: Mapping[str, Mapping], section: str, label: str, fields: Sequence[tuple[str, str]], digits: int):
    """Markdown rows: one per key of ``section`` (splits, attacks, tasks), one column per (field, model)."""
    names = list(models)
    header = [label] + [f"{title} {n}" for _, title in fields for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in next(iter(models.values()))[section]:
        if key.startswith("_") or key == "privleak":
            continue
        row = [key] + [
            _fmt(models[n].get(section, {}).get(key, {}).get(field), digits) for field, _ in fields for n in names
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def markdown(report: Mapping[str, Any]) -> str:
    models: Mapping[str, Mapping] = report["models"]  # e.g. {"original": ..., "unlearned": ..., "oracle": ...}
    names = list(models)
    stamp = report.get("stamp", {})
    lines = [f"# jaxunlearn report: {stamp.get('title', '')}".rstrip(), ""]
    model = stamp.get("model")
    if isinstance(model, Mapping):
        lines.append(
            f"- **model**: {model.get('path')} ({model.get('model_type')}, {model.get('num_params', 0):,} parameters)"
        )
    for key in ("method", "seed", "mesh", "dtypes", "device", "steps", "stopped"):
        if key in stamp:
            lines.append(f"- **{key}**: {stamp[key]}")
    if "versions" in stamp:
        lines.append("- **versions**: " + ", ".join(f"{k} {v}" for k, v in stamp["versions"].items()))
    lines.append("")

    first = next(iter(models.values()))
    if "perplexity" in first:
        lines += [
            "## Perplexity and next-token accuracy",
            "",
            "`ppl`: exp of the mean over chunks of the per-chunk mean NLL (the official definition); "
            "`ppl_token`: token-weighted.",
            "",
        ]
        lines += _table(models, "perplexity", "split", [("ppl", "ppl"), ("ppl_token", "ppl_token"), ("acc", "acc")], 4)
    if first.get("mia"):
        pairs = first["mia"].get("_pairs", {})
        lines += [
            "## Membership inference (forget = members, approximate = non-members)",
            "",
            f"{pairs.get('members', '?')} member and {pairs.get('nonmembers', '?')} non-member chunks. AUC near "
            "0.5 means the forget set looks like unseen data; report.json also has `auc_folded` = max(AUC, "
            "1 - AUC), as the official code reports.",
            "",
        ]
        fields = [("auc", "AUC"), ("tpr@1%fpr", "TPR@1%FPR"), ("tpr@5%fpr", "TPR@5%FPR")]
        lines += _table(models, "mia", "attack", fields, 3)
        leak = {n: models[n]["mia"]["privleak"] for n in names if models[n].get("mia", {}).get("privleak")}
        if leak:
            lines += [
                "PrivLeak (MUSE, Min-K% k=0.4, relative to the retrained model): "
                + ", ".join(f"{n} {_fmt(v['min_k_0.4'], 3)}" for n, v in leak.items()),
                "",
            ]
    if first.get("verbatim"):
        lines += ["## Verbatim memorisation (greedy continuation of chunk prefixes)", ""]
        fields = [("exact_match", "exact"), ("rougeL_f1", "ROUGE-L F1"), ("token_match", "token match")]
        lines += _table(models, "verbatim", "split", fields, 3)
    if first.get("tasks"):
        lines += ["## Multiple-choice tasks", ""]
        lines += _table(models, "tasks", "task", [("acc", "acc"), ("acc_norm", "acc_norm")], 3)
    if report.get("oracle_distance"):
        distance = report["oracle_distance"]
        keys = list(next(iter(distance.values())))
        lines += [
            "## Distance to the oracle (exact retrain without the forget set)",
            "",
            "| model | " + " | ".join(keys) + " |",
            "|" + "---|" * (1 + len(keys)),
        ]
        lines += [f"| {n} | " + " | ".join(_fmt(d.get(k), 4) for k in keys) + " |" for n, d in distance.items()]
        lines.append("")
    compute = report.get("compute")
    if compute:
        lines += ["## Compute", ""] + [
            f"- **{k}**: {_fmt(v) if isinstance(v, float) else v}" for k, v in compute.items()
        ]
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def plot_history(history: Sequence[Mapping[str, Any]], path: Path, stop_target: float | None = None) -> Path | None:
    """Perplexity of every split against the unlearning step (log scale)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    splits = sorted({s for h in history for s in h["perplexity"]})
    steps = [h["step"] for h in history]
    for split in splits:
        ax.plot(steps, [h["perplexity"].get(split, {}).get("ppl", np.nan) for h in history], marker="o", label=split)
    if stop_target:
        ax.axhline(stop_target, color="grey", linestyle="--", label="stop target")
    ax.set_yscale("log")
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_roc(scores_by_model: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], path: Path) -> Path | None:
    """ROC curves of the key attacks, one panel per model (e.g. before / after)."""
    panels = {name: s for name, s in scores_by_model.items() if s}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, scores) in zip(axes[0], panels.items()):
        for attack in KEY_ATTACKS:
            if attack not in scores["forget"]:
                continue
            member, nonmember = scores["forget"][attack], scores["approximate"][attack]
            values = np.r_[member, nonmember]
            labels = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
            ok = np.isfinite(values)
            fpr, tpr = M.roc_curve(labels[ok], values[ok])
            ax.plot(fpr, tpr, label=f"{attack} ({M.auc(fpr, tpr):.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(name)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _order(preferred: Sequence[str]):
    return lambda name: (preferred.index(name) if name in preferred else len(preferred), name)


def summary(report: Mapping[str, Any], attack: str = "min_k_0.4") -> str:
    """A few lines for the terminal: perplexity per split and one attack's AUC, one column per model."""
    models: Mapping[str, Mapping] = report["models"]
    names = sorted(models, key=_order(("original", "unlearned", "oracle")))  # report.json sorts keys
    rows: list[tuple[str, list[Any]]] = []
    first = next(iter(models.values()))
    for split in sorted(first.get("perplexity", {}), key=_order(("forget", "approximate", "retain", "general"))):
        rows.append((f"{split} ppl", [models[n].get("perplexity", {}).get(split, {}).get("ppl") for n in names]))
    if attack in first.get("mia", {}):
        rows.append((f"{attack} AUC", [models[n].get("mia", {}).get(attack, {}).get("auc") for n in names]))
    width = max([len(label) for label, _ in rows] + [5])
    lines = [" " * width + "".join(f"{n:>12}" for n in names)]
    lines += [f"{label:<{width}}" + "".join(f"{_fmt(v):>12}" for v in values) for label, values in rows]
    return "\n".join(lines)


def write_report(
    directory: str | Path,
    *,
    stamp: Mapping[str, Any],
    models: Mapping[str, Mapping[str, Any]],
    scores: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    compute: Mapping[str, Any] | None = None,
    oracle_distance: Mapping[str, Mapping[str, float]] | None = None,
    stop_target: float | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and plots into ``directory``; return the report dict.

    ``models`` maps a column name (``original``, ``unlearned``, ``oracle`` or just ``model``) to the metrics
    of :func:`~jaxunlearn.evaluation.suite.evaluate_model`. With ``original`` and ``unlearned`` the report
    also holds their difference (``change``).
    """
    directory = Path(directory)
    # Every process holds the same report; only process 0 writes it (concurrent writers would race).
    writer = jax.process_index() == 0
    plots = []
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        plots = [
            p
            for p in (
                plot_history(history, directory / "perplexity_history.png", stop_target),
                plot_roc(scores or {}, directory / "roc.png"),
            )
            if p
        ]
    report: dict[str, Any] = {"stamp": dict(stamp), "models": dict(models)}
    if "original" in models and "unlearned" in models:
        report["change"] = _change(models["original"], models["unlearned"])
    if history:
        report["history"] = list(history)
    if compute:
        report["compute"] = dict(compute)
    if oracle_distance:
        report["oracle_distance"] = dict(oracle_distance)
    report["plots"] = [str(p) for p in plots]
    if writer:
        write_json(directory / "report.json", report)
        (directory / "report.md").write_text(markdown(report))
    return report
