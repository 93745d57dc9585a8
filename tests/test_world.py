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
    from jaxunlearn.hf_checkpoint import load_tokenizer

    tok = load_tokenizer(world.tokenizer)
    forget = tokenize_and_chunk(forget_texts, tok, 32, add_special_tokens=False, pad_id=tok.pad_token_id)
    forget_rows = {row.tobytes() for row in forget.tokens}
    oracle_rows = [row.tobytes() for row in seen["oracle"].tokens]
    target_rows = [row.tobytes() for row in seen["target"].tokens]
    assert not forget_rows & set(oracle_rows)
    assert all(target_rows.count(r) >= 2 for r in forget_rows)
    assert len(seen["target"]) == len(seen["oracle"]) + 2 * len(forget)
    assert world.manifest["training_documents"]["oracle"] == {"retain": 1, "general_retain": 1}


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


def test_main_command_end_to_end_on_a_small_world(tmp_path):
    args = [
        sys.executable,
        "-m",
        "jaxunlearn.main",
        f"--config={REPO / 'configs' / 'ga_kl.py'}",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.max_steps=4",
        "--config.evaluation.max_chunks=32",
        "--config.evaluation.in_run_max_chunks=16",
        "--config.evaluation.verbatim.prompt_tokens=8",
        "--config.evaluation.verbatim.new_tokens=8",
        "--config.evaluation.verbatim.max_chunks=8",
    ]
    args += [f"--config.world.{k}={v}" for k, v in SMALL.items()]
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "JAXUNLEARN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building the built-in world" in result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["models"]) == {"original", "oracle", "unlearned"}
    distance = {name: model.get("oracle_distance") for name, model in report["models"].items()}
    assert distance["oracle"] is None and distance["original"] and distance["unlearned"]
    assert {"forget_ppl_ratio", "min_k_0.4_auc_diff", "kl_forget", "kl_retain"} <= set(distance["unlearned"])
    assert report["models"]["unlearned"]["mia"]["privleak"]["min_k_0.4"] == pytest.approx(
        (
            report["models"]["unlearned"]["mia"]["min_k_0.4"]["auc"]
            - report["models"]["oracle"]["mia"]["min_k_0.4"]["auc"]
        )
        / report["models"]["oracle"]["mia"]["min_k_0.4"]["auc"]
        * 100
    )
    assert np.isfinite(distance["unlearned"]["kl_forget"])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Distance to the oracle" in md
    assert md.startswith("# jaxunlearn report: ga_kl on world:target\n")  # not the cache path
    assert "forget: world:forget (built-in world)" in md and "lr 0.0003" in md
    assert "report" in json.loads((tmp_path / "run" / "run.json").read_text())


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
