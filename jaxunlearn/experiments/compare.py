"""The paper's experiment: all seven methods, each with a small learning-rate sweep, on one world.

    python -m jaxunlearn.experiments.compare --config=configs/ga_kl.py [--workdir=workdirs/compare]
        [--methods=ga,ga_kl] [--lr_multipliers=0.3,1,3] [--config.KEY=VALUE ...]

The config supplies everything but the method and learning rate (world, data, evaluation, training); each
variant starts from its own config file's defaults for the same preset, with the command line's overrides
applied on top. Every run is an ordinary resumable run in ``<workdir>/<variant>/lr-<lr>`` (finished runs are
reused). Writes ``compare.md``, ``compare.json`` and ``compare.png`` to the workdir.

Selection: the best learning rate of a method, and the best method, minimise the *distance to the oracle*
``|ln(forget ppl / oracle forget ppl)| + |Min-K% AUC - oracle AUC| + max(0, ln(retain ppl / original))
+ max(0, ln(general ppl / original))`` (Min-K% with k = 0.4); without an oracle, the forget perplexity is
compared with the approximate split's instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

from jaxunlearn import cpu_devices, locations
from jaxunlearn.cli import CONFIG_HELP, config_files, run_command
from jaxunlearn.cli import fail as _fail

VARIANTS = ("ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general")  # the paper's
AUC_ATTACK = "min_k_0.4"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"The base config (world, data, evaluation). {CONFIG_HELP}", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/compare", "Experiment directory.")
_METHODS = flags.DEFINE_list("methods", list(VARIANTS), "Shipped config names to compare.")
_LRS = flags.DEFINE_list("lr_multipliers", ["0.3", "1", "3"], "Learning rates tried, relative to each config's.")
_PRESET = flags.DEFINE_string("preset", "builtin", "The preset the variants are built with (builtin/arxiv/github).")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _set(config, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for name in parents:
        config = config[name]
    config[leaf] = value


def variant_config(name: str, preset: str, overrides: dict[str, Any], lr_multiplier: float):
    """The shipped config ``name`` for ``preset``, with ``overrides`` applied and its learning rate scaled."""
    path = config_files()[name]
    spec = importlib.util.spec_from_file_location(f"jaxunlearn_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    for key, value in overrides.items():
        if key.startswith("method.") and key.split(".", 1)[1] not in config.method:
            continue  # a hyper-parameter of another method (e.g. beta for the GA variants)
        _set(config, key, value)
    config.optim.lr = float(config.optim.lr * lr_multiplier)
    return config


def command_line_overrides(config, preset: str) -> dict[str, Any]:
    """Fields of ``config`` that differ from its method's base defaults (method name and lr excluded)."""
    from jaxunlearn.config import base_config

    default = _flat(base_config(config.method.name, preset=preset).to_dict())
    given = _flat(config.to_dict())
    skip = ("method.name", "optim.lr", "data.retain.")
    return {k: v for k, v in given.items() if default.get(k) != v and not k.startswith(skip)}


def _ppl(model: dict, split: str) -> float:
    return model["perplexity"][split]["ppl"]


def summarise(report: dict) -> dict[str, Any]:
    """One table row from a run's report."""
    models = report["models"]
    original, unlearned, oracle = models["original"], models["unlearned"], models.get("oracle")
    row = {
        "steps": report["stamp"]["steps"],
        "stopped": bool(report["stamp"].get("stopped")),
        "forget_ppl": _ppl(unlearned, "forget"),
        "approximate_ppl": _ppl(unlearned, "approximate"),
        "retain_ppl": _ppl(unlearned, "retain"),
        "general_ppl": _ppl(unlearned, "general"),
        "retain_change": _ppl(unlearned, "retain") / _ppl(original, "retain") - 1,
        "general_change": _ppl(unlearned, "general") / _ppl(original, "general") - 1,
        "auc": unlearned["mia"][AUC_ATTACK]["auc"],
        "loss_auc": unlearned["mia"]["loss"]["auc"],
        "verbatim_rougeL": unlearned["verbatim"]["forget"].get("rougeL_f1", math.nan),
        "retrain_over_unlearn": report["compute"]["retraining_over_unlearning"],
    }
    reference_ppl = _ppl(oracle, "forget") if oracle else _ppl(original, "approximate")
    reference_auc = oracle["mia"][AUC_ATTACK]["auc"] if oracle else 0.5
    row["forget_ppl_vs_reference"] = row["forget_ppl"] / reference_ppl
    row["auc_vs_reference"] = row["auc"] - reference_auc
    if oracle:
        distance = report["models"]["unlearned"]["oracle_distance"]
        row.update(kl_forget=distance["kl_forget"], kl_retain=distance.get("kl_retain", math.nan))
    row["score"] = (
        abs(math.log(row["forget_ppl_vs_reference"]))
        + abs(row["auc_vs_reference"])
        + max(0.0, math.log1p(row["retain_change"]))
        + max(0.0, math.log1p(row["general_change"]))
    )
    return row


def targets(report: dict, best: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The built-in world's acceptance targets, with the measured values."""
    models = report["models"]
    original, oracle = models["original"], models.get("oracle")
    ratio = _ppl(original, "forget") / _ppl(original, "approximate")
    auc0 = original["mia"][AUC_ATTACK]["auc"]
    out = [
        ("before: forget ppl <= 0.8 x approximate ppl", f"{ratio:.3f} x", ratio <= 0.8),
        ("before: Min-K% (k=0.4) AUC >= 0.75", f"{auc0:.3f}", auc0 >= 0.75),
    ]
    if oracle:
        out += [
            (
                "after: forget ppl within 10% of the oracle's",
                f"{best['forget_ppl_vs_reference'] - 1:+.1%}",
                abs(best["forget_ppl_vs_reference"] - 1) <= 0.10,
            ),
            (
                "after: Min-K% AUC within 0.05 of the oracle's",
                f"{best['auc_vs_reference']:+.3f}",
                abs(best["auc_vs_reference"]) <= 0.05,
            ),
        ]
    out += [
        (
            "after: retain ppl at most 5% above the original's",
            f"{best['retain_change']:+.1%}",
            best["retain_change"] <= 0.05,
        ),
        (
            "after: general ppl at most 5% above the original's",
            f"{best['general_change']:+.1%}",
            best["general_change"] <= 0.05,
        ),
    ]
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.4g}"
    return str(x)


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


def write_outputs(directory: Path, rows: list[dict[str, Any]], reference: dict) -> dict[str, Any]:
    """``compare.json``, ``compare.md`` and ``compare.png`` from every run's row and one run's report."""
    best_by_variant = {}
    for row in rows:
        if row["variant"] not in best_by_variant or row["score"] < best_by_variant[row["variant"]]["score"]:
            best_by_variant[row["variant"]] = row
    best = min(best_by_variant.values(), key=lambda r: r["score"])
    models = reference["models"]
    result = {
        "rows": rows,
        "best_per_method": best_by_variant,
        "best": best,
        "original": {s: _ppl(models["original"], s) for s in models["original"]["perplexity"]},
        "oracle": {s: _ppl(models["oracle"], s) for s in models["oracle"]["perplexity"]}
        if "oracle" in models
        else None,
        "original_auc": models["original"]["mia"][AUC_ATTACK]["auc"],
        "oracle_auc": models["oracle"]["mia"][AUC_ATTACK]["auc"] if "oracle" in models else None,
        "targets": [dict(target=t, value=v, met=m) for t, v, m in targets(reference, best)],
    }
    import jax

    if jax.process_index() == 0:  # every process holds the same result; one writes it
        (directory / "compare.json").write_text(json.dumps(result, indent=2))
        (directory / "compare.md").write_text(_markdown(result, rows, best_by_variant, best))
        _plot(directory / "compare.png", best_by_variant, result)
    return result


def _table_rows(rows) -> list[str]:
    return ["| " + " | ".join(_fmt(r.get(c, math.nan)) for c in COLUMNS) + " |" for r in rows]


def _markdown(result: dict, rows: list[dict], best_by_variant: dict, best: dict) -> str:
    header = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    o = result["original"]
    lines = ["# Unlearning methods compared", ""]
    lines.append(
        f"Original model: forget ppl {o['forget']:.4g}, approximate {o['approximate']:.4g}, "
        f"retain {o['retain']:.4g}, general {o['general']:.4g}; Min-K% (k=0.4) AUC {result['original_auc']:.3f}."
    )
    if result["oracle"]:
        r = result["oracle"]
        lines.append(
            f"Oracle (retrained without the forget set): forget ppl {r['forget']:.4g}, approximate "
            f"{r['approximate']:.4g}, retain {r['retain']:.4g}, general {r['general']:.4g}; Min-K% AUC "
            f"{result['oracle_auc']:.3f}."
        )
    lines += ["", "## Best learning rate per method (lower score = closer to the oracle)", "", *header]
    lines += _table_rows(sorted(best_by_variant.values(), key=lambda r: r["score"]))
    lines += ["", f"Best: **{best['variant']}** at lr {best['lr']:.3g}.", "", "## Targets", ""]
    lines += ["| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {_fmt(t['met'])} |" for t in result["targets"]]
    lines += ["", "## Every run", "", *header, *_table_rows(rows), "", "![comparison](compare.png)", ""]
    return "\n".join(lines)


def _plot(path: Path, best: dict[str, dict], result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(best)
    panels = [
        (
            "forget_ppl",
            "forget perplexity",
            result["oracle"]["forget"] if result["oracle"] else None,
            result["original"]["forget"],
        ),
        (
            "retain_ppl",
            "retain perplexity",
            result["oracle"]["retain"] if result["oracle"] else None,
            result["original"]["retain"],
        ),
        (
            "general_ppl",
            "general perplexity",
            result["oracle"]["general"] if result["oracle"] else None,
            result["original"]["general"],
        ),
        ("auc", "Min-K% (k=0.4) AUC", result["oracle_auc"], result["original_auc"]),
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


def read_report(run_dir: str) -> dict[str, Any]:
    """A finished run's ``report.json``, as process 0 reads it (only process 0 writes it), on every process."""
    import jax

    from jaxunlearn import sharding

    text = None
    if jax.process_index() == 0:
        with contextlib.suppress(FileNotFoundError):
            text = locations.read_text(locations.join(run_dir, "report.json"), "--workdir")
    text = sharding.from_process0(text)
    if text is None:
        raise FileNotFoundError(f"{run_dir} has no report.json: the comparison needs config.evaluation.enabled=True")
    return json.loads(text)


def run_comparison(config, workdir: str | Path, methods, multipliers, preset: str) -> dict[str, Any]:
    from jaxunlearn import sharding
    from jaxunlearn.engine import unlearn

    if config.get("distributed", False):
        sharding.initialize_distributed()  # once for every run below (each run's own call then does nothing)
    base = locations.shown(workdir)
    locations.check(base, "--workdir")  # before any run
    overrides = command_line_overrides(config, preset)
    rows, reference = [], None
    for name in methods:
        for multiplier in multipliers:
            variant = variant_config(name, preset, overrides, multiplier)
            run_dir = locations.join(base, name, f"lr-{variant.optim.lr:.3g}")
            print(f"[compare] {name} lr={variant.optim.lr:.3g} -> {run_dir}", flush=True)
            unlearn(variant, run_dir)
            report = read_report(run_dir)
            reference = reference or report
            rows.append({"variant": name, "lr": variant.optim.lr, **summarise(report)})
    with locations.output_directory(base, "--workdir") as directory:
        return write_outputs(directory, rows, reference)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        _fail("--config=CONFIG is required: a config file or a shipped config's name (e.g. --config=ga_kl)")
    known = list(config_files())
    unknown = [m for m in _METHODS.value if m not in known]
    if unknown:
        _fail(f"--methods: unknown {', '.join(unknown)}; choose from the configs {', '.join(known)}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    multipliers = [float(x) for x in _LRS.value]
    cpu_devices.configure(_CONFIG.value)  # before JAX starts: one CPU device per core
    result = run_comparison(_CONFIG.value, _WORKDIR.value, _METHODS.value, multipliers, _PRESET.value)
    print(f"comparison: {locations.join(locations.shown(_WORKDIR.value), 'compare.md')}", file=sys.stdout)
    print(f"best: {result['best']['variant']} at lr {result['best']['lr']:.3g}")


def run() -> None:
    run_command(main, __name__)


if __name__ == "__main__":
    run()
