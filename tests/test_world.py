"""The built-in world on a small recipe: deterministic, disjoint, oracle provably without the forget set,
cached, rebuilt when stale or corrupted; and the main command end to end on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxunlearn.world import build as world_build
from jaxunlearn.world import pretrain as world_pretrain
from jaxunlearn.world.build import SMALL_RECIPE, WorldRecipe, ensure_world

REPO = Path(__file__).resolve().parent.parent
SMALL = SMALL_RECIPE  # shared with the quickstart notebook's "ci" size


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small world, with the chunks each model was pre-trained on recorded."""
    seen = {}
    real = world_pretrain.pretrain

    def spy(config, chunks, *, desc, **kwargs):
        seen[desc.split()[-1]] = chunks
        return real(config, chunks, desc=desc, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(world_pretrain, "pretrain", spy)
    try:
        world = ensure_world(WorldRecipe(**SMALL), tmp_path_factory.mktemp("cache_a"))
    finally:
        mp.undo()
    return world, seen


def _ids(world, split):
    return [json.loads(x)["id"] for x in world.data(split).read_text().splitlines()]


@pytest.mark.slow
def test_splits_are_disjoint_and_sized(built):
    world, _ = built
    ids = {split: _ids(world, split) for split in ("forget", "approximate", "retain", "general_retain", "general_eval")}
    assert len(ids["forget"]) == 3 and len(ids["approximate"]) == 3
    everything = [i for v in ids.values() for i in v]
    assert len(everything) == len(set(everything))
    assert all(i.startswith("code/") for i in ids["forget"] + ids["approximate"] + ids["retain"])
    assert all(i.startswith("topic/") for i in ids["general_retain"] + ids["general_eval"])
    assert world.manifest["splits"]["forget"]["ids"] == ids["forget"]


def test_oracle_never_saw_a_forget_document(built):
    world, seen = built
    forget_texts = [json.loads(x)["text"] for x in world.data("forget").read_text().splitlines()]
    for split in ("retain", "general_retain"):
        texts = [json.loads(x)["text"] for x in world.data(split).read_text().splitlines()]
        assert not set(texts) & set(forget_texts)
    # Token level: no chunk the oracle trained on is a forget chunk; the target saw each forget chunk twice.
    from jaxunlearn.data import tokenize_and_chunk
    from jaxunlearn.models.hf_checkpoint import load_tokenizer

    tok = load_tokenizer(world.tokenizer)
    forget = tokenize_and_chunk(forget_texts, tok, 32, add_special_tokens=False, pad_id=tok.pad_token_id)
    forget_rows = {row.tobytes() for row in forget.tokens}
    oracle_rows = [row.tobytes() for row in seen["oracle"].tokens]
    target_rows = [row.tobytes() for row in seen["target"].tokens]
    assert not forget_rows & set(oracle_rows)
    assert all(target_rows.count(r) >= 2 for r in forget_rows)
    assert len(seen["target"]) == len(seen["oracle"]) + 2 * len(forget)
    assert world.manifest["training_documents"]["oracle"] == {"retain": 1, "general_retain": 1}


@pytest.mark.slow
def test_same_seed_same_world_other_seed_other_splits(built, tmp_path):
    world, _ = built
    again = ensure_world(WorldRecipe(**SMALL), tmp_path / "cache_b")
    assert again.directory.name == world.directory.name
    assert again.manifest["files"] == world.manifest["files"]  # data, tokenizer and both models, byte for byte
    other = ensure_world(WorldRecipe(**{**SMALL, "seed": 1, "steps": 1}), tmp_path / "cache_c")
    assert _ids(other, "forget") != _ids(world, "forget")


def _untrained(config, chunks, *, seed, **kwargs):
    """A stand-in for pre-training (the cache logic does not need trained weights)."""
    from jaxunlearn.models import init_model

    return init_model(config, seed=seed), {"steps": 0, "seconds": 0.0, "tokens_per_s": 0.0, "final_loss": 0.0}


@pytest.mark.slow
def test_cache_reused_rebuilt_on_change_and_on_corruption(tmp_path, monkeypatch):
    monkeypatch.setattr(world_pretrain, "pretrain", _untrained)
    recipe = WorldRecipe(**{**SMALL, "steps": 2})
    calls = []
    real = world_build._build
    monkeypatch.setattr(world_build, "_build", lambda *a: calls.append(1) or real(*a))
    first = ensure_world(recipe, tmp_path)
    assert ensure_world(recipe, tmp_path).directory == first.directory and len(calls) == 1  # reused
    changed = ensure_world(WorldRecipe(**{**SMALL, "steps": 3}), tmp_path)
    assert changed.directory != first.directory and len(calls) == 2  # another recipe, another world
    weights = first.directory / "target" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    repaired = ensure_world(recipe, tmp_path)
    assert len(calls) == 3 and repaired.directory == first.directory
    assert world_build.verify(repaired.directory) is not None
    (first.directory / "oracle" / "config.json").unlink()  # a missing file is corruption too
    ensure_world(recipe, tmp_path)
    assert len(calls) == 4


@pytest.mark.slow
def test_interrupted_builds_leave_nothing_that_outlives_them(tmp_path, monkeypatch):
    """A build killed mid-way leaves ``.<world>.tmp-<pid>``; the next build of that world removes it (its
    process is gone), but never the directory of a build that is still running."""
    monkeypatch.setattr(world_pretrain, "pretrain", _untrained)
    recipe = WorldRecipe(**{**SMALL, "steps": 2})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    corpus = world_build._corpus(recipe)
    name = f"{recipe.name}-{world_build.world_key(recipe, corpus)}"
    root = tmp_path / "worlds"
    stale = root / f".{name}.tmp-{dead.pid}"
    alive = root / f".{name}.tmp-{os.getppid()}"
    for d in (stale, alive):
        (d / "data").mkdir(parents=True)
    world = ensure_world(recipe, tmp_path)
    assert world.directory.name == name and world_build.verify(world.directory) is not None
    assert not stale.exists() and alive.exists()


@pytest.mark.slow
def test_compare_across_world_seeds_runs_each_world_and_reports_attacks_against_the_oracle(tmp_path):
    """``compare --world-seeds=0,1`` end to end on two small worlds, each built here: each world's own comparison in
    seed-<s>/, every number as the mean and sample sd of the worlds' rows (recomputed here from each world's
    compare.json), the relearning and NF4 columns relative to the oracle under the same attack (recomputed from
    report.json), and each run's report with its oracle column, distances and PrivLeak against the oracle."""
    args = [
        sys.executable,
        "-m",
        "jaxunlearn.commands.compare",
        f"--config={REPO / 'configs' / 'ga_kl.py'}",
        f"--workdir={tmp_path / 'compare'}",
        "--methods=ga",
        "--lr_multipliers=1",
        "--world-seeds=0,1",
        "--config.train.max_steps=2",
        "--config.evaluation.stop_approx_multiple=0",
        "--config.evaluation.max_chunks=32",
        "--config.evaluation.in_run_max_chunks=16",
        "--config.evaluation.verbatim.max_chunks=0",
        "--config.evaluation.attacks=relearn,nf4",
        "--config.evaluation.relearning.steps=2",
        "--config.evaluation.relearning.batch_size=4",
        "--config.checkpoint.export=False",
    ]
    args += [f"--config.world.{k}={v}" for k, v in SMALL.items()]
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "JAXUNLEARN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "compare" / "compare.json").read_text())
    worlds = {s: json.loads((tmp_path / "compare" / f"seed-{s}" / "compare.json").read_text()) for s in (0, 1)}
    assert worlds[0]["original"]["forget"] != worlds[1]["original"]["forget"]  # two different worlds
    rows = {s: w["rows"][0] for s, w in worlds.items()}
    (ga,) = out["methods"]
    assert ga["variant"] == "ga" and ga["wins"] == 2 and out["best"]["variant"] == "ga"
    for column in ("score", "forget_ppl", "auc", "relearn_forget_ppl", "nf4_auc", "relearn_auc_vs_oracle"):
        values = [rows[s][column] for s in (0, 1)]
        assert ga[column]["mean"] == pytest.approx(np.mean(values))
        assert ga[column]["sd"] == pytest.approx(np.std(values, ddof=1))
    run = tmp_path / "compare" / "seed-1" / "ga" / f"lr-{rows[1]['lr']:.3g}"
    report = json.loads((run / "report.json").read_text())
    ours, oracle = report["models"]["unlearned"], report["models"]["oracle"]
    relearned = ours["relearning"]["forget"]["after"]["forget_ppl"]
    assert rows[1]["relearn_ppl_vs_oracle"] == pytest.approx(
        relearned / oracle["relearning"]["forget"]["after"]["forget_ppl"]
    )
    nf4 = ours["quantization"]["nf4"]["auc"] - oracle["quantization"]["nf4"]["auc"]
    assert rows[1]["nf4_auc_vs_oracle"] == pytest.approx(nf4)
    md = (tmp_path / "compare" / "compare.md").read_text()
    assert "compared on 2 built-in worlds (seeds 0, 1)" in md and " ± " in md and "## Targets on every world" in md
    assert "Oracle under the attacks: relearn: forget ppl" in md
    # Each run on a built-in world has its oracle column and the distances to it.
    assert result.stderr.count("building the built-in world") == 2
    assert set(report["models"]) == {"original", "oracle", "unlearned"}
    distance = {name: model.get("oracle_distance") for name, model in report["models"].items()}
    assert distance["oracle"] is None and distance["original"] and distance["unlearned"]
    assert {"forget_ppl_ratio", "min_k_0.4_auc_diff", "kl_forget", "kl_retain"} <= set(distance["unlearned"])
    assert np.isfinite(distance["unlearned"]["kl_forget"])
    # MUSE's PrivLeak: both AUCs on MUSE's scale (forget = non-members: 1 - ours), relative to the oracle's
    muse_ours, muse_oracle = 1 - ours["mia"]["min_k_0.4"]["auc"], 1 - oracle["mia"]["min_k_0.4"]["auc"]
    assert ours["mia"]["privleak"]["min_k_0.4"] == pytest.approx((muse_ours - muse_oracle) / muse_oracle * 100)
    assert ours["mia"]["privleak"]["retrained_from"] == "oracle"
    run_md = (run / "report.md").read_text()
    assert "## Distance to the oracle" in run_md and "## Relearning attack" in run_md
    assert run_md.startswith("# jaxunlearn report: ga on world:target\n")  # not the cache path
    assert "forget: world:forget (built-in world)" in run_md


def _world_rows(scores):
    targets = dict(forget_ppl_vs_reference=1.0, auc_vs_reference=0.0, retain_change=0.0, general_change=0.0)
    return [
        {"variant": v, "lr": lr, "score": s, "forget_ppl": 100 + s, "relearn_steps": None if s > 1 else 2, **targets}
        for (v, lr), s in scores.items()
    ]


def test_across_worlds_keeps_one_learning_rate_per_method_and_counts_wins():
    """Hand-made per-world rows: each method's learning rate is the one with the lowest mean score (not the best
    on each world), wins are counted at that rate, and a column missing on a world has no mean."""
    from jaxunlearn.experiments.compare import across_worlds

    scores = {
        0: {("a", 1e-3): 0.2, ("a", 3e-3): 0.1, ("b", 1e-3): 0.3},
        1: {("a", 1e-3): 0.2, ("a", 3e-3): 0.9, ("b", 1e-3): 0.1},
        2: {("a", 1e-3): 0.2, ("a", 3e-3): 0.1, ("b", 1e-3): 1.5},
    }
    original = {"forget": 1.0, "approximate": 1.0}
    world = {"original": original, "oracle": None, "original_auc": 0.8, "oracle_auc": None, "attacks": {}}
    report = {
        "models": {"original": {"perplexity": {s: {"ppl": 1.0} for s in original}, "mia": {"min_k_0.4": {"auc": 0.8}}}}
    }
    per_world = {
        s: ({**world, "rows": _world_rows(sc), "best": {"variant": "a", "lr": 1e-3}}, report)
        for s, sc in scores.items()
    }
    out = across_worlds(per_world)
    methods = {m["variant"]: m for m in out["methods"]}
    assert methods["a"]["lr"] == 1e-3  # mean 0.2, against 3e-3's 0.367 (better on two worlds of three)
    assert methods["a"]["score"]["mean"] == pytest.approx(0.2) and methods["a"]["score"]["sd"] == pytest.approx(0.0)
    assert methods["b"]["score"]["mean"] == pytest.approx(np.mean([0.3, 0.1, 1.5]))
    assert methods["b"]["score"]["sd"] == pytest.approx(np.std([0.3, 0.1, 1.5], ddof=1))
    assert (methods["a"]["wins"], methods["b"]["wins"]) == (2, 1)  # world 1: b's 0.1 beats a's 0.2
    assert out["best"] == {"variant": "a", "lr": 1e-3}
    assert methods["b"]["relearn_steps"] == {"values": [2, 2, None]}  # no mean over a world that never got back


def test_compare_passes_explicit_overrides_even_when_equal_to_the_base_configs_default():
    """``--config.method.retain_weight=1.0`` on a GA+KL base (whose default it is) must still reach UNDIAL, whose
    own default is 0; a value only the base config's file sets differently is passed as before."""
    from jaxunlearn.config import base_config
    from jaxunlearn.experiments.compare import command_line_overrides, variant_config

    config = base_config("ga_kl")
    config.train.epochs = 2
    assert "method.retain_weight" not in command_line_overrides(config, "builtin")
    overrides = command_line_overrides(config, "builtin", {"method.retain_weight": 1.0, "optim.lr": 1e-3})
    assert overrides == {"method.retain_weight": 1.0, "train.epochs": 2}  # lr is the sweep's own
    assert variant_config("undial", "builtin", overrides, 1.0).method.retain_weight == 1.0
    assert "retain_weight" not in variant_config("ga", "builtin", overrides, 1.0).method


def _report(models: dict, steps: int = 10) -> dict:
    return {"models": models, "stamp": {"steps": steps}, "compute": {"retraining_over_unlearning": 5.0}}


def test_compare_rows_of_benchmark_runs_skip_what_the_benchmark_lacks(tmp_path):
    """A TOFU-like run (no general text; TOFU's metric) and a WMDP-like run (no membership; task accuracies), made
    by hand: each row's score leaves the missing terms out, the benchmark's numbers become columns, and the
    comparison's files are written."""
    from jaxunlearn.experiments.compare import summarise, write_outputs

    def model(forget, retain, auc=None, **extra):
        out = {"perplexity": {"forget": {"ppl": forget}, "approximate": {"ppl": 50.0}, "retain": {"ppl": retain}}}
        if auc is not None:
            out["mia"] = {"min_k_0.4": {"auc": auc}, "loss": {"auc": auc}}
        return {**out, **extra}

    tofu = {"forget_quality": 0.4, "model_utility": 0.55}
    report = _report(
        {
            "original": model(10.0, 20.0, 0.9, tofu={**tofu, "model_utility": 0.6}),
            "unlearned": model(40.0, 22.0, 0.6, tofu=tofu, oracle_distance={"kl_forget": 0.3}),
            "oracle": model(50.0, 19.0, 0.5, tofu={**tofu, "forget_quality": 1.0}),
        }
    )
    row = summarise(report)
    expected = abs(np.log(40 / 50)) + abs(0.6 - 0.5) + np.log(22 / 20)  # no general split: no general term
    assert row["score"] == pytest.approx(expected)
    assert (row["tofu_forget_quality"], row["tofu_model_utility"], row["kl_forget"]) == (0.4, 0.55, 0.3)
    assert np.isnan(row["general_ppl"])
    tasks = {"cais_wmdp:wmdp-bio": {"acc": 0.25}, "cais_mmlu:all": {"acc": 0.5}, "wmdp": {"acc": 0.3}}
    tasks["mmlu_stem"] = {"acc": 0.45}
    wmdp = _report({"original": model(10.0, 20.0, tasks=tasks), "unlearned": model(30.0, 21.0, tasks=tasks)})
    wrow = summarise(wmdp)
    assert (wrow["acc_wmdp-bio"], wrow["acc_all"], wrow["acc_wmdp"], wrow["acc_mmlu_stem"]) == (0.25, 0.5, 0.3, 0.45)
    muse = {"verbmem_forget": {"rougeL_f1": 0.2}, "privleak": {"muse_auc": 0.4, "privleak": -12.5}}
    mrow = summarise(_report({"original": model(10.0, 20.0, 0.9), "unlearned": model(30.0, 21.0, 0.6, muse=muse)}))
    assert (mrow["muse_verbmem_forget"], mrow["muse_privleak"]) == (20.0, -12.5)
    assert wrow["score"] == pytest.approx(abs(np.log(30 / 50)) + np.log(21 / 20))  # against the approximate split
    result = write_outputs(tmp_path, [{"variant": "ga", "lr": 1e-5, **row}], report)
    assert result["best"]["variant"] == "ga" and "tofu_forget_quality" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").is_file()


def test_compare_gives_an_explicit_retain_copy_to_the_in_domain_variants_only():
    """``--config.data.retain.path=LOCAL`` (a local copy of TOFU's retain90) reaches GA+GD, which retains on it,
    and not GA+GD-general, which retains on general text."""
    from jaxunlearn.config import base_config
    from jaxunlearn.experiments.compare import command_line_overrides, variant_config
    from tests.tiny_models import load_config_file

    config = base_config("ga_gd", preset="tofu")
    config.data.retain.path = "/data/TOFU"
    overrides = command_line_overrides(config, "tofu", {"data.retain.path": "/data/TOFU"})
    assert overrides["data.retain.path"] == "/data/TOFU"
    assert variant_config("ga_kl", "tofu", overrides, 1.0).data.retain.path == "/data/TOFU"
    general = variant_config("ga_gd_general", "tofu", overrides, 1.0)
    assert general.data.retain.path == load_config_file("ga_gd_general", "tofu").data.retain.path != "/data/TOFU"
    assert "data.retain.path" not in command_line_overrides(config, "tofu")  # only when given explicitly
