"""Running the comparison: every variant x learning rate on one world, its result and files; the same on
several built-in worlds, and the result across them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxunlearn.experiments.compare.rendering import columns, markdown, plot, worlds_markdown
from jaxunlearn.experiments.compare.scoring import attack_measurements, auc, ppl, summarise, targets
from jaxunlearn.experiments.compare.variants import command_line_overrides, variant_config
from jaxunlearn.experiments.runs import read_report
from jaxunlearn.parallel import sharding
from jaxunlearn.run.engine import unlearn
from jaxunlearn.storage import locations


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
        "original": {s: ppl(models["original"], s) for s in models["original"]["perplexity"]},
        "oracle": {s: ppl(models["oracle"], s) for s in models["oracle"]["perplexity"]} if "oracle" in models else None,
        "original_auc": auc(models["original"]),
        "oracle_auc": auc(models["oracle"]) if "oracle" in models else None,
        "targets": [dict(target=t, value=v, met=m) for t, v, m in targets(reference, best)],
        "attacks": {name: attack_measurements(models[name]) for name in ("original", "oracle") if name in models},
    }


def write_outputs(directory: Path, rows: list[dict[str, Any]], reference: dict) -> dict[str, Any]:
    """``compare.json``, ``compare.md`` and ``compare.png`` from every run's row and one run's report."""
    result = world_result(rows, reference)
    import jax

    if jax.process_index() == 0:  # every process holds the same result; one writes it
        (directory / "compare.json").write_text(json.dumps(result, indent=2))
        (directory / "compare.md").write_text(markdown(result, rows, result["best_per_method"], result["best"]))
        plot(directory / "compare.png", result["best_per_method"], result)
    return result


def compare_world(
    base: str, methods, multipliers, preset: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method x learning rate on one world, in ``base``; writes its comparison and returns it with one run's
    report (the world's original and oracle numbers)."""
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
            (directory / "compare.md").write_text(worlds_markdown(result))
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
