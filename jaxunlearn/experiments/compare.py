"""The paper's experiment: all seven methods, each with a small learning-rate sweep, on one world.

    python -m jaxunlearn.experiments.compare --config=configs/ga_kl.py [--workdir=workdirs/compare]
        [--methods=ga,ga_kl] [--lr_multipliers=0.3,1,3] [--world_seeds=0,1,2] [--config.KEY=VALUE ...]

The config supplies everything but the method and learning rate (world, data, evaluation, training); each
variant starts from its own config file's defaults for the same preset, with the command line's overrides
applied on top. Every run is an ordinary resumable run in ``<workdir>/<variant>/lr-<lr>`` (finished runs are
reused). Writes ``compare.md``, ``compare.json`` and ``compare.png`` to the workdir.

``--world_seeds`` (or ``--world-seeds``) repeats the whole comparison on built-in worlds of those seeds
(``config.world.seed``: other forget/retain documents, another tokenizer, other initialisations; each world built
once and cached), in ``<workdir>/seed-<s>/``, and reports every number as mean +- sd across the worlds. Each method
keeps one learning rate for all of them (the one with the lowest mean score), and the comparison counts on how
many worlds each method is the best.

Selection: the best learning rate of a method, and the best method, minimise the *distance to the oracle*
``|ln(forget ppl / oracle forget ppl)| + |Min-K% AUC - oracle AUC| + max(0, ln(retain ppl / original))
+ max(0, ln(general ppl / original))`` (Min-K% with k = 0.4); without an oracle, the forget perplexity is
compared with the approximate split's instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxunlearn import cpu_devices, locations
from jaxunlearn.cli import CONFIG_HELP, config_files, refusals, run_command
from jaxunlearn.cli import fail as _fail
from jaxunlearn.experiments.runs import read_report

VARIANTS = ("ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general")  # the paper's
AUC_ATTACK = "min_k_0.4"


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


def command_line_overrides(config, preset: str, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fields of ``config`` that differ from its method's base defaults, and the ``explicit`` command-line
    overrides (``--config.KEY=VALUE``, even when equal to the base config's default: ``retain_weight=1`` must reach
    a method whose own default is 0); method name and lr excluded."""
    from jaxunlearn.config import base_config

    default = _flat(base_config(config.method.name, preset=preset).to_dict())
    given = _flat(config.to_dict())
    skip = ("method.name", "optim.lr", "data.retain.")
    keys = [k for k, v in given.items() if default.get(k) != v] + [k for k in explicit or {} if k in given]
    return {k: given[k] for k in dict.fromkeys(keys) if not k.startswith(skip)}


def _ppl(model: dict, split: str) -> float:
    """A split's perplexity, NaN for a split the run does not have (the benchmark presets have no general text)."""
    return model["perplexity"].get(split, {}).get("ppl", math.nan)


def _auc(model: dict | None, attack: str = AUC_ATTACK) -> float:
    """A membership attack's AUC, NaN for a run without the ``mia`` metric (WMDP)."""
    return (model or {}).get("mia", {}).get(attack, {}).get("auc", math.nan)


def _term(x: float) -> float:
    """A score term; a missing number (NaN) counts 0."""
    return 0.0 if math.isnan(x) else x


def benchmark_columns(unlearned: dict) -> dict[str, Any]:
    """The benchmarks' headline numbers of a run: TOFU's forget quality and model utility, MUSE's criteria (ROUGE-L
    F1 x 100) and each multiple-choice task's accuracy (WMDP, MMLU, ...)."""
    row = {}
    if "tofu" in unlearned:
        row.update(tofu_forget_quality=unlearned["tofu"].get("forget_quality", math.nan))
        row.update(tofu_model_utility=unlearned["tofu"]["model_utility"])
    for key, value in unlearned.get("muse", {}).items():
        row[f"muse_{key}"] = 100 * value["rougeL_f1"]
    for task, value in unlearned.get("tasks", {}).items():
        row[f"acc_{task.rsplit(':', 1)[-1]}"] = value["acc"]
    return row


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
        "auc": _auc(unlearned),
        "loss_auc": _auc(unlearned, "loss"),
        "verbatim_rougeL": unlearned.get("verbatim", {}).get("forget", {}).get("rougeL_f1", math.nan),
        "retrain_over_unlearn": report["compute"]["retraining_over_unlearning"],
    }
    reference_ppl = _ppl(oracle, "forget") if oracle else _ppl(original, "approximate")
    reference_auc = _auc(oracle) if oracle else 0.5
    row["forget_ppl_vs_reference"] = row["forget_ppl"] / reference_ppl
    row["auc_vs_reference"] = row["auc"] - reference_auc
    if oracle and "oracle_distance" in unlearned:
        distance = unlearned["oracle_distance"]
        row.update(kl_forget=distance.get("kl_forget", math.nan), kl_retain=distance.get("kl_retain", math.nan))
    row["score"] = (
        _term(abs(math.log(row["forget_ppl_vs_reference"])))
        + _term(abs(row["auc_vs_reference"]))
        + _term(max(0.0, math.log1p(row["retain_change"])))
        + _term(max(0.0, math.log1p(row["general_change"])))
    )
    row.update(attack_columns(unlearned, oracle))
    row.update(benchmark_columns(unlearned))
    return row


# Relearning corpora (the relearning metric's) -> column prefix.
RELEARN_PREFIXES = {"forget": "relearn", "retain": "relearn_related"}


def attack_measurements(model: dict) -> dict[str, dict[str, Any]]:
    """``{attack: {forget_ppl, auc[, steps]}}`` of one model's report entry: its forget perplexity and Min-K%
    AUC after each relearning attack (and the steps back to the original's level) and each quantization."""
    out = {}
    for corpus, prefix in RELEARN_PREFIXES.items():
        attack = (model.get("relearning") or {}).get(corpus)
        if attack:
            after = attack["after"]
            out[prefix] = {
                "forget_ppl": after["forget_ppl"],
                "auc": after["auc"],
                "steps": attack.get("steps_to_original"),
            }
    for scheme, measured in (model.get("quantization") or {}).items():
        if scheme != "none":
            out[scheme] = {"forget_ppl": measured["forget_ppl"], "auc": measured.get("auc", math.nan)}
    return out


def attack_columns(unlearned: dict, oracle: dict | None) -> dict[str, Any]:
    """The unlearned model under each attack, and against the oracle under the same attack: ``<attack>_forget_ppl``,
    ``<attack>_auc``, ``<attack>_steps`` (relearning: steps back to the original's forget perplexity, None = not
    within the attack), ``<attack>_ppl_vs_oracle`` (ratio) and ``<attack>_auc_vs_oracle`` (difference)."""
    theirs = attack_measurements(oracle) if oracle else {}
    row = {}
    for attack, m in attack_measurements(unlearned).items():
        row.update({f"{attack}_{k}": v for k, v in m.items()})
        if attack in theirs:
            row[f"{attack}_ppl_vs_oracle"] = m["forget_ppl"] / theirs[attack]["forget_ppl"]
            row[f"{attack}_auc_vs_oracle"] = m["auc"] - theirs[attack]["auc"]
    return row


def targets(report: dict, best: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The built-in world's acceptance targets, with the measured values."""
    models = report["models"]
    original, oracle = models["original"], models.get("oracle")
    ratio = _ppl(original, "forget") / _ppl(original, "approximate")
    auc0 = _auc(original)
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
    if x is None:
        return "-"
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


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: :data:`COLUMNS`, then every attack column some row has, in first-seen order."""
    extra = [k for row in rows for k in row if k not in COLUMNS and k != "stopped" and not k.endswith("_change")]
    return list(COLUMNS) + list(dict.fromkeys(extra))


def world_result(rows: list[dict[str, Any]], reference: dict) -> dict[str, Any]:
    """One world's comparison: every row, each method's best learning rate, the best method, the original's and
    the oracle's numbers (under each attack too) and the targets."""
    best_by_variant = {}
    for row in rows:
        if row["variant"] not in best_by_variant or row["score"] < best_by_variant[row["variant"]]["score"]:
            best_by_variant[row["variant"]] = row
    best = min(best_by_variant.values(), key=lambda r: r["score"])
    models = reference["models"]
    return {
        "rows": rows,
        "best_per_method": best_by_variant,
        "best": best,
        "original": {s: _ppl(models["original"], s) for s in models["original"]["perplexity"]},
        "oracle": {s: _ppl(models["oracle"], s) for s in models["oracle"]["perplexity"]}
        if "oracle" in models
        else None,
        "original_auc": _auc(models["original"]),
        "oracle_auc": _auc(models["oracle"]) if "oracle" in models else None,
        "targets": [dict(target=t, value=v, met=m) for t, v, m in targets(reference, best)],
        "attacks": {name: attack_measurements(models[name]) for name in ("original", "oracle") if name in models},
    }


def write_outputs(directory: Path, rows: list[dict[str, Any]], reference: dict) -> dict[str, Any]:
    """``compare.json``, ``compare.md`` and ``compare.png`` from every run's row and one run's report."""
    result = world_result(rows, reference)
    import jax

    if jax.process_index() == 0:  # every process holds the same result; one writes it
        (directory / "compare.json").write_text(json.dumps(result, indent=2))
        (directory / "compare.md").write_text(_markdown(result, rows, result["best_per_method"], result["best"]))
        _plot(directory / "compare.png", result["best_per_method"], result)
    return result


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


def _markdown(result: dict, rows: list[dict], best_by_variant: dict, best: dict) -> str:
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


def _plot(path: Path, best: dict[str, dict], result: dict) -> None:
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


def _worlds_markdown(result: dict[str, Any]) -> str:
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


def compare_world(
    base: str, methods, multipliers, preset: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method x learning rate on one world, in ``base``; writes its comparison and returns it with one run's
    report (the world's original and oracle numbers)."""
    from jaxunlearn.engine import unlearn

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
        return write_outputs(directory, rows, reference), reference


def run_comparison(
    config,
    workdir: str | Path,
    methods,
    multipliers,
    preset: str,
    world_seeds: list[int] | None = None,
    explicit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The comparison on the config's world, or on each world of ``world_seeds`` and across them; ``explicit``:
    the command line's ``--config.*`` overrides (:func:`command_line_overrides`)."""
    from jaxunlearn import sharding

    if config.get("distributed", False):
        sharding.initialize_distributed()  # once for every run below (each run's own call then does nothing)
    base = locations.shown(workdir)
    locations.check(base, "--workdir")  # before any run
    overrides = command_line_overrides(config, preset, explicit)
    if not world_seeds:
        return compare_world(base, methods, multipliers, preset, overrides)[0]
    per_world = {}
    for seed in world_seeds:
        print(f"[compare] world seed {seed}", flush=True)
        per_world[seed] = compare_world(
            locations.join(base, f"seed-{seed}"), methods, multipliers, preset, {**overrides, "world.seed": seed}
        )
    result = across_worlds(per_world)
    import jax

    with locations.output_directory(base, "--workdir") as directory:
        if jax.process_index() == 0:
            (directory / "compare.json").write_text(json.dumps(result, indent=2))
            (directory / "compare.md").write_text(_worlds_markdown(result))
    return result


# --- across worlds -------------------------------------------------------------------------------------------


def _mean_sd(values: list[Any]) -> dict[str, Any]:
    """``{mean, sd, values}`` of per-world values (sd: the sample standard deviation, 0 for one world); without
    a mean when some world has no number (a relearning attack that never got back)."""
    out: dict[str, Any] = {"values": values}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        arr = np.asarray(values, np.float64)
        out.update(mean=float(arr.mean()), sd=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)
    return out


def across_worlds(per_world: dict[int, tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """``per_world``: seed -> (its comparison, one of its reports). Each method's numbers as mean +- sd over the worlds, at the one learning rate per method with the lowest
    mean score; on how many worlds each method is the best (at that learning rate); the targets on every world
    for the method with the lowest mean score."""
    seeds = list(per_world)
    settings: dict[tuple[str, float], dict[int, dict]] = {}
    for seed, (world, _) in per_world.items():
        for row in world["rows"]:
            settings.setdefault((row["variant"], row["lr"]), {})[seed] = row
    complete = {k: v for k, v in settings.items() if len(v) == len(seeds)}
    summaries = {}
    for (variant, lr), by_seed in complete.items():
        rows = [by_seed[s] for s in seeds]
        cols = [c for c in columns(rows) if c not in ("variant", "lr")]
        summaries[(variant, lr)] = {
            "variant": variant,
            "lr": lr,
            **{c: _mean_sd([r.get(c) for r in rows]) for c in cols if any(c in r for r in rows)},
        }
    chosen = {}
    for (variant, _), summary in summaries.items():
        if variant not in chosen or summary["score"]["mean"] < chosen[variant]["score"]["mean"]:
            chosen[variant] = summary
    wins = dict.fromkeys(chosen, 0)
    for seed in seeds:
        scores = {v: complete[(v, c["lr"])][seed]["score"] for v, c in chosen.items()}
        wins[min(scores, key=scores.get)] += 1
    for variant, summary in chosen.items():
        summary["wins"] = wins[variant]
    best = min(chosen.values(), key=lambda r: r["score"]["mean"])
    per_seed_targets = {
        seed: [
            dict(target=t, value=v, met=m)
            for t, v, m in targets(reference, complete[(best["variant"], best["lr"])][seed])
        ]
        for seed, (_, reference) in per_world.items()
    }
    return {
        "world_seeds": seeds,
        "methods": sorted(chosen.values(), key=lambda r: r["score"]["mean"]),
        "settings": list(summaries.values()),
        "best": {"variant": best["variant"], "lr": best["lr"]},
        "targets": per_seed_targets,
        "worlds": {
            seed: {k: w[k] for k in ("original", "oracle", "original_auc", "oracle_auc", "attacks", "best")}
            for seed, (w, _) in per_world.items()
        },
    }


def define_flags() -> SimpleNamespace:
    """The command's flags (defined when it runs: :func:`jaxunlearn.cli.run_command`)."""
    args = SimpleNamespace(
        config=config_flags.DEFINE_config_file(
            "config", None, f"The base config (world, data, evaluation). {CONFIG_HELP}", lock_config=True
        ),
        workdir=flags.DEFINE_string("workdir", "workdirs/compare", "Experiment directory."),
        methods=flags.DEFINE_list("methods", list(VARIANTS), "Shipped config names to compare."),
        lr_multipliers=flags.DEFINE_list(
            "lr_multipliers", ["0.3", "1", "3"], "Learning rates tried, relative to each config's."
        ),
        preset=flags.DEFINE_string(
            "preset",
            "builtin",
            "The preset the variants are built with (builtin, arxiv, github, books, tofu, muse_news, wmdp, ...).",
        ),
        world_seeds=flags.DEFINE_list(
            "world_seeds", [], "Built-in world seeds to repeat the comparison on (default: the config's)."
        ),
    )
    flags.DEFINE_alias("world-seeds", "world_seeds")
    return args


def main(argv: list[str], args: SimpleNamespace) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir, methods, preset = args.config.value, args.workdir.value, args.methods.value, args.preset.value
    if config is None:
        _fail("--config=CONFIG is required: a config file or a shipped config's name (e.g. --config=ga_kl)")
    known = list(config_files())
    unknown = [m for m in methods if m not in known]
    if unknown:
        _fail(f"--methods: unknown {', '.join(unknown)}; choose from the configs {', '.join(known)}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    multipliers = [float(x) for x in args.lr_multipliers.value]
    cpu_devices.configure(config)  # before JAX starts: one CPU device per core
    given = ",".join(args.world_seeds.value)
    try:
        seeds = [int(x) for x in args.world_seeds.value]
    except ValueError:
        _fail(f"--world_seeds={given}: give integers, e.g. --world_seeds=0,1,2")
    if seeds and len(set(seeds)) != len(seeds):
        _fail(f"--world_seeds={given}: a seed appears twice")
    if seeds and preset != "builtin":
        _fail(f"--world_seeds repeats the comparison on built-in worlds: it needs --preset=builtin, not {preset}")
    explicit = config_flags.get_override_values(flags.FLAGS["config"])
    try:
        result = run_comparison(config, workdir, methods, multipliers, preset, seeds, explicit)
    except refusals() as e:  # a run's bad data, model or workdir: one line naming it, not a traceback
        _fail(str(e))
    print(f"comparison: {locations.join(locations.shown(workdir), 'compare.md')}", file=sys.stdout)
    print(f"best: {result['best']['variant']} at lr {result['best']['lr']:.3g}")


def run() -> None:
    run_command(main, __name__, define_flags)


if __name__ == "__main__":
    run()
