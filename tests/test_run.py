"""A run's life around the step loop: hooks, one run per workdir, how a run ends in run.json, signals, re-export
of a finished run in another dtype, damaged evaluation caches, headless progress lines, shared permissions."""

import json
import os
import signal
import subprocess
import time

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxunlearn.evaluation.runner import shared_eval_directory
from jaxunlearn.run.engine import unlearn
from jaxunlearn.training.hooks import Hooks, StepInfo
from tests.test_cli import REPO, run_cli, run_cli_args
from tests.tiny_models import tiny_run_config, write_tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return {**write_tiny_setup(root), "cache": root / "cache", "root": root}


# --- hooks ------------------------------------------------------------------------------------------------


def test_hooks_run_by_period_in_order_and_one_hook_can_end_the_run():
    calls = []
    hooks = Hooks()
    hooks.add(lambda i: calls.append(("every2", i.step)), every=2)

    def stop_at_5(info):  # a new stopping rule: one hook, no change to any loop
        if info.step == 5:
            info.stopped = {"step": 5}

    hooks.add(stop_at_5)
    hooks.add(lambda i: calls.append(("save", i.step, i.finishing)), every=3, at_end=True)
    hooks.add(lambda i: calls.append(("never", i.step)), every=0)
    for step in range(1, 9):
        info = StepInfo(step, 8, None, {}, 0, 0.0)
        hooks(info)
        if info.ending:
            break
    assert calls == [
        ("every2", 2),
        ("save", 3, False),
        ("every2", 4),
        ("save", 5, True),  # not a multiple of 3: saved because the stopping hook before it ended the run
    ]
    with pytest.raises(ValueError, match="every=-1"):
        hooks.add(print, every=-1)


@pytest.mark.slow
def test_trainer_loop_stops_on_a_hook_and_reports_where(setup):
    """The real loop with a real (tiny) train step: a hook that stops at step 2 ends it there."""
    from jaxunlearn.run.prepare import prepare
    from jaxunlearn.training.loop import Trainer

    config = tiny_run_config(setup, "ga", setup["cache"], train__max_steps=5)
    config.evaluation.enabled = False
    prep = prepare(config)
    import jax

    from jaxunlearn.methods.context import Context
    from jaxunlearn.methods.registry import get_method
    from jaxunlearn.models import hf_checkpoint, param_shardings
    from jaxunlearn.parallel import sharding
    from jaxunlearn.training.step import (
        batch_shardings,
        compile_train_step,
        init_state,
        make_optimizer,
        make_train_step,
        state_shardings,
    )

    lm, params = hf_checkpoint.load_model(prep.model_dir, prep.config.model, mesh=prep.mesh)
    tx, schedule = make_optimizer(prep.config.optim, prep.total_steps)
    shardings = state_shardings(tx, param_shardings(prep.model_config, prep.mesh), prep.mesh)
    b_sh = batch_shardings(prep.batcher.batch(0), prep.mesh)
    ctx = Context.for_run(lm, prep.config.method, seed=0, tokenizer=prep.tokenizer, chunk_size=8)
    step_fn = compile_train_step(make_train_step(get_method("ga"), ctx, tx, schedule), shardings, None, b_sh, prep.mesh)
    trainer = Trainer(step_fn, prep.batcher, b_sh, None, prep.total_steps)
    seen = []

    def stop_at_2(info):
        if info.step == 2:
            info.stopped = {"step": 2}

    trainer.add_hook(lambda info: seen.append((info.step, round(info.metrics["loss"], 6))))
    trainer.add_hook(stop_at_2)
    with sharding.activation_sharding(prep.mesh):
        result = trainer.run(init_state(params, tx, shardings), start=0)
    assert [s for s, _ in seen] == [1, 2] and result.steps == 2 and result.stopped == {"step": 2}
    assert int(jax.device_get(result.state["step"])) == 2
    assert result.last_metrics["loss"] == pytest.approx(seen[-1][1], abs=1e-6)


# --- one run per workdir, how runs end --------------------------------------------------------------------


def _env(**extra):
    return {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), **extra}


def _wait_for(predicate, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the first run ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_busy_workdir_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_stale_lock(setup, tmp_path):
    run = tmp_path / "run"
    args = run_cli_args(setup, "ga", run, "--config.train.max_steps=100000", "--config.checkpoint.every_steps=0")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(args, env=_env(), stdout=log, stderr=log, cwd=REPO)
    try:
        _wait_for(lambda: (run / "run.json").exists(), first)
        second = run_cli(setup, "ga", run, "--config.train.max_steps=100000", "--config.checkpoint.every_steps=0")
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{run} is in use by another jaxunlearn run (pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
        assert json.loads((run / "run.json").read_text())["status"] == "running"  # the holder's record, untouched
    finally:
        first.kill()
        first.wait()
    # The kernel released the killed run's lock: the next run takes the workdir over at once.
    third = run_cli(setup, "ga", run, "--config.train.max_steps=2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_records_interrupted(setup, tmp_path):
    run = tmp_path / "run"
    extra = ("--config.train.max_steps=100000", "--config.checkpoint.every_steps=0", "--config.checkpoint.keep=1")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(run_cli_args(setup, "ga", run, *extra), env=_env(), stdout=log, stderr=log, cwd=REPO)
    _wait_for(
        lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3, first
    )
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted" and "rerun to resume" in record["error"]
    steps = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3  # the interrupted step was checkpointed
    lines = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, steps[0] + 1))


@pytest.mark.slow
def test_failures_are_recorded_in_run_json(setup, tmp_path):
    from jaxunlearn.run.engine import NonFiniteError

    config = tiny_run_config(setup, "ga", setup["cache"], optim__lr=1e30, train__max_steps=6)
    config.evaluation.enabled = False
    with pytest.raises(NonFiniteError):
        unlearn(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "non_finite" and "step 3" in record["error"]


# --- a finished run: re-export, damaged caches --------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    config = tiny_run_config(setup, "ga_gd", setup["cache"], train__max_steps=2)
    config.evaluation.verbatim.max_chunks = 4
    unlearn(config, root / "run")
    return root / "run", config


@pytest.mark.slow
def test_changed_export_dtype_re_exports_a_finished_run(finished):
    run, config = finished
    fp32 = load_file(run / "hf_model" / "model.safetensors")
    config = config.copy_and_resolve_references()
    config.checkpoint.export_dtype = "bfloat16"
    record = unlearn(config, run)
    assert record["status"] == "completed" and record["steps"] == 2
    assert json.loads((run / "hf_model" / "config.json").read_text())["dtype"] == "bfloat16"
    bf16 = load_file(run / "hf_model" / "model.safetensors")
    assert bf16.keys() == fp32.keys()
    for name, value in fp32.items():
        assert bf16[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(bf16[name], value.astype(ml_dtypes.bfloat16), err_msg=name)


def test_damaged_cached_evaluations_are_recomputed_not_fatal(finished, caplog):
    run, config = finished
    before = json.loads((run / "report.json").read_text())["models"]
    # The unlearned model's evaluation is the run's; the original checkpoint's is shared by runs in <cache>/eval.
    shared = [
        p
        for p in shared_eval_directory(config).glob("original-*.json")
        if json.loads(json.loads(p.read_text())["key"])["path"] == config.model.path
    ]
    cached = sorted((run / "eval").glob("*-*.json")) + shared
    assert [p.name.split("-")[0] for p in cached] == ["unlearned", "original"]
    cached[0].write_text(cached[0].read_text()[:100])  # truncated
    entry = json.loads(cached[1].read_text())
    entry["value"]["perplexity"]["forget"]["ppl"] = 1.0  # edited: the checksum no longer matches
    cached[1].write_text(json.dumps(entry))
    caplog.set_level("WARNING", logger="jaxunlearn")
    unlearn(config, run)
    warned = " ".join(r.getMessage() for r in caplog.records if "damaged cached evaluation" in r.getMessage())
    assert str(cached[0]) in warned and str(cached[1]) in warned
    after = json.loads((run / "report.json").read_text())["models"]
    assert after == before


# --- headless runs, log.txt, permissions --------------------------------------------------------------------


@pytest.mark.slow
def test_headless_progress_lines_log_file_and_shared_permissions(setup, tmp_path):
    run = tmp_path / "run"
    args = run_cli_args(setup, "ga", run, "--config.train.max_steps=4", "--config.train.log_every=2")
    previous = os.umask(0o022)  # inherited by the run
    try:
        result = subprocess.run(args, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [line for line in result.stderr.splitlines() if "tokens/s  ETA" in line]  # no TTY: no bar, lines
    assert [line.split()[2] for line in progress] == ["2/4", "4/4"]
    assert all(" loss " in line for line in progress)
    log = (run / "log.txt").read_text()
    assert "data.forget: 8 documents" in log  # written before the workdir existed, kept for log.txt
    assert "step 4/4" in log and log.index("data.forget") < log.index("starting ga")
    for path in [run / "hf_model", *(run / "hf_model").iterdir(), run / "run.json", run / "log.txt"]:
        expected = 0o755 if path.is_dir() else 0o644
        assert path.stat().st_mode & 0o777 == expected, path


def test_a_setting_added_since_the_run_started_blocks_resume_only_when_it_changes_something():
    """A checkpointed run's stored config lacks keys added to jaxunlearn since: at an empty default ("", 0, off) they
    are the behaviour the run had, anything else is a different configuration."""
    from jaxunlearn.run.workdir import config_differences

    old = {"data": {"forget": {"path": "f.jsonl"}}, "optim": {"lr": 1e-5}}
    added = {"data": {"forget": {"path": "f.jsonl", "tfds_data_dir": "", "question": ""}, "qa_template": ""}}
    assert config_differences(old, {**added, "optim": {"lr": 1e-5}}) == []
    changed = {"data": {"forget": {"path": "f.jsonl", "question": "question"}}, "optim": {"lr": 1e-5}}
    assert config_differences(old, changed) == ["config.data.forget.question"]
    assert config_differences(old, {**added, "optim": {"lr": 2e-5}}) == ["config.optim.lr"]
    removed = {"data": {"forget": {"path": "f.jsonl"}}}
    assert config_differences(old, removed) == ["config.optim.lr"]  # a value that was set and is gone


def test_a_checkpoint_whose_deletion_a_kill_cut_short_is_removed_without_a_warning_each_run(tmp_path, caplog):
    """Orbax deletes old steps (max_to_keep) with rmtree; a kill in the middle leaves a step without its metadata,
    about which Orbax warns "Metadata file does not exist" on every later run. The next run removes it once."""
    import shutil

    import jax.numpy as jnp

    from jaxunlearn.storage.checkpoints import Checkpointer

    directory = tmp_path / "checkpoints"
    first = Checkpointer(directory, keep=3)
    for step in (1, 2):
        first.save(step, {"w": jnp.full(3, float(step))}, {"step": step})
    first.wait()
    first.close()
    (directory / "1" / "_CHECKPOINT_METADATA").unlink()  # as a kill during rmtree leaves it
    shutil.rmtree(directory / "1" / "state")
    for rerun in range(2):
        caplog.clear()
        checkpointer = Checkpointer(directory, keep=3)
        assert checkpointer.latest_step() == 2 and checkpointer.read_meta(2) == {"step": 2}
        checkpointer.close()
        assert "Metadata file does not exist" not in caplog.text
        assert ("incomplete checkpoint" in caplog.text) == (rerun == 0)  # removed once, said once
    assert sorted(p.name for p in directory.iterdir()) == ["2"]
