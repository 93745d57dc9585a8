"""``report.json`` + ``report.md`` + PNG plots for a run (before/after unlearning) or a single model.

The tables come from the metrics that ran, each rendering its own section (:mod:`jaxunlearn.evaluation.registry`);
this module writes the header (what was run, on what data, where), the run-level sections (compute, the
perplexity history) and the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxunlearn.evaluation.registry import ARTIFACTS, get_metric
from jaxunlearn.evaluation.tables import fmt
from jaxunlearn.storage.files import write_json


def _change(before: Any, after: Any) -> Any:
    """``after - before`` for every number present in both (recursively)."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out = {k: _change(before[k], after[k]) for k in before if k in after}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and not isinstance(before, bool):
        return after - before
    return None


def _model_line(model: Mapping[str, Any]) -> str:
    loaded = f", loaded from `{model['path']}`" if model.get("source") not in (None, model.get("path")) else ""
    name = model.get("source") or model.get("path")
    return f"{name} ({model.get('model_type')}, {model.get('num_params', 0):,} parameters){loaded}"


def _joined(separator: str, sep_kv: str = " ") -> Any:
    return lambda d, _: separator.join(f"{k}{sep_kv}{v}" for k, v in d.items())


# The header's bullet points in order: stamp key -> how to render its value (report.json keeps raw values).
_HEADER = (
    ("model", lambda v, _: _model_line(v) if isinstance(v, Mapping) else str(v)),
    ("method", lambda v, stamp: v + _hparams(stamp.get("hparams"))),
    ("optimizer", lambda v, _: str(v)),
    ("stopped", lambda v, _: _stopped(v)),
    ("data", _joined("; ", ": ")),
    ("steps", lambda v, _: str(v)),
    ("seed", lambda v, _: str(v)),
    ("mesh", _joined(" x ")),
    ("dtypes", _joined(", ")),
    ("device", lambda v, _: str(v)),
    ("versions", _joined(", ")),
)


def _hparams(hparams: Mapping[str, Any] | None) -> str:
    return f" ({', '.join(f'{k}={fmt(v)}' for k, v in hparams.items())})" if hparams else ""


def _header(stamp: Mapping[str, Any]) -> list[str]:
    """The stamp as bullet points: what ran, on which model and data, how, where, and how it ended."""
    lines = [f"# jaxunlearn report: {stamp.get('title', '')}".rstrip(), ""]
    for key, render in _HEADER:
        if stamp.get(key) is not None and stamp.get(key) != {}:
            lines.append(f"- **{key}**: {render(stamp[key], stamp)}")
    return lines + [""]


def _stopped(stopped: Any) -> str:
    if not isinstance(stopped, Mapping):
        return str(stopped)
    measured = f" on {stopped['chunks']} evenly spaced forget chunks" if "chunks" in stopped else ""
    return (
        f"by the stopping rule at step {stopped['step']}: forget perplexity {fmt(stopped['forget_ppl'])} >= "
        f"target {fmt(stopped['target'])}, measured{measured} (evaluation.in_run_max_chunks; the tables below use "
        "up to evaluation.max_chunks chunks, so their forget perplexity differs)"
    )


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: the header, every metric's own section (in the order they ran), compute and plots."""
    models: Mapping[str, Mapping] = report["models"]  # e.g. {"original": ..., "oracle": ..., "unlearned": ...}
    lines = _header(report.get("stamp", {}))
    for name in report.get("metrics", ()):
        results = {model: metrics[name] for model, metrics in models.items() if metrics.get(name)}
        if results:
            metric = get_metric(name)
            lines += metric.report(results, {**metric.defaults(), **report.get("evaluation", {}).get(name, {})})
    compute = report.get("compute")
    if compute:
        lines += ["## Compute", ""] + [
            f"- **{k}**: {fmt(v) if isinstance(v, float) else v}" for k, v in compute.items()
        ]
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def plot_history(history: Sequence[Mapping[str, Any]], path: Path, stop_target: float | None = None) -> Path | None:
    """Perplexity of every split against the unlearning step (log scale); the legend sits outside the axes."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.0))
    splits = sorted({s for h in history for s in h["perplexity"]})
    steps = [h["step"] for h in history]
    for split in splits:
        ax.plot(steps, [h["perplexity"].get(split, {}).get("ppl", np.nan) for h in history], marker="o", label=split)
    if stop_target:
        ax.axhline(stop_target, color="grey", linestyle="--", label="stop target")
    ax.set_yscale("log")
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("perplexity")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
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
    lines += [f"{label:<{width}}" + "".join(f"{fmt(v):>12}" for v in values) for label, values in rows]
    return "\n".join(lines)


def _plots(directory: Path, results: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], history, stop_target):
    plots = [plot_history(history, directory / "perplexity_history.png", stop_target)]
    for name in metrics:
        metric = get_metric(name)
        artifacts = {m: r[name][ARTIFACTS] for m, r in results.items() if ARTIFACTS in r.get(name, {})}
        if metric.plot is not None and artifacts:
            plots.append(metric.plot(artifacts, directory))
    return [p for p in plots if p]


def write_report(
    directory: str | Path,
    *,
    stamp: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str],
    options: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    compute: Mapping[str, Any] | None = None,
    stop_target: float | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and plots into ``directory``; return the report dict.

    ``results`` maps a column name (``original``, ``unlearned``, ``oracle`` or just ``model``) to its metrics
    (``{metric name: result}``, artifacts included; report.json leaves them out). ``metrics`` lists the metric
    names in report order and ``options`` their options. With ``original`` and ``unlearned`` the report also
    holds their difference (``change``).
    """
    directory = Path(directory)
    # Every process holds the same report; only process 0 writes it (concurrent writers would race).
    writer = jax.process_index() == 0
    plots = []
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        plots = _plots(directory, results, metrics, history, stop_target)
    models = {m: {k: _strip(v) for k, v in r.items()} for m, r in results.items()}
    report: dict[str, Any] = {"stamp": dict(stamp), "models": models, "metrics": list(metrics)}
    report["evaluation"] = dict(options or {})
    if "original" in models and "unlearned" in models:
        report["change"] = _change(models["original"], models["unlearned"])
    if history:
        report["history"] = list(history)
    if compute:
        report["compute"] = dict(compute)
    report["plots"] = [str(p) for p in plots]
    if writer:
        write_json(directory / "report.json", report)
        (directory / "report.md").write_text(markdown(report))
    return report


def _strip(result: Any) -> Any:
    return {k: v for k, v in result.items() if k != ARTIFACTS} if isinstance(result, Mapping) else result
