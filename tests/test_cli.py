"""The command line end to end: every paper config, config errors, hard-kill resume."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.tiny_models import write_tiny_setup

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general"]  # the paper's
BEYOND = ["npo", "npo_gd", "simnpo", "wga", "satimp", "rmu", "undial", "ce_u", "task_vector"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {**write_tiny_setup(root), "cache": root / "cache"}


def run_cli_args(setup, config, workdir, *extra) -> list[str]:
    """The main command on the tiny setup (fp32, 32-token chunks, no evaluation), plus ``extra`` flags."""
    return [
        sys.executable,
        "-m",
        "jaxunlearn.main",
        f"--config={REPO / 'configs' / config}.py",
        f"--workdir={workdir}",
        f"--config.model.path={setup['model']}",
        "--config.model.dtype=float32",
        f"--config.data.forget.path={setup['forget']}",
        f"--config.data.retain.path={setup['retain']}",
        "--config.data.max_length=32",
        f"--config.data.cache_dir={setup['cache']}",
        "--config.evaluation.enabled=False",
        "--config.train.micro_batch_size=4",
        "--config.train.grad_accum_steps=2",
        "--config.optim.lr=1e-3",
        *extra,
    ]


def run_cli(setup, config, workdir, *extra, env=None):
    args = run_cli_args(setup, config, workdir, *extra)
    full_env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), **(env or {})}  # one CPU device
    return subprocess.run(args, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=300)


EXPECTED_METRICS = {
    "ga": {"forget_nll"},
    "random_label": {"label_nll"},
    "adversarial": {"label_nll"},
    "ga_gd": {"forget_nll", "retain_nll"},
    "ga_kl": {"forget_nll", "retain_kl"},
    "ga_gd_general": {"forget_nll", "retain_nll"},
    "ga_kl_general": {"forget_nll", "retain_kl"},
    "npo": {"npo", "forget_nll"},
    "npo_gd": {"npo", "forget_nll", "retain_nll"},
    "simnpo": {"simnpo", "forget_nll", "retain_nll"},
    "wga": {"wga", "forget_nll", "retain_nll"},
    "satimp": {"satimp", "forget_nll", "retain_nll"},
    "rmu": {"rmu_forget", "rmu_retain"},
    "undial": {"undial", "retain_nll"},
    "ce_u": {"ce_u", "retain_nll"},
    "task_vector": {"forget_nll"},
}
RETAIN_TERMS = {"retain_nll", "retain_kl", "rmu_retain"}


def unlearn_tiny(setup, config, workdir, **fields):
    """The main command's run of :func:`run_cli_args` (``config``'s file, the tiny setup, no evaluation) in this
    process, on 4 x 2 of the tests' 8 devices, with ``section__field=value`` settings; returns the run record.
    The command line around it is tested once (:func:`test_the_main_command_runs_a_config_and_says_where_it_wrote`):
    in-process runs skip a Python and JAX start-up each."""
    from jaxunlearn.run.engine import unlearn
    from tests.tiny_models import load_config_file

    c = load_config_file(config)
    c.model.path, c.model.dtype = str(setup["model"]), "float32"
    c.data.forget.path, c.data.retain.path = str(setup["forget"]), str(setup["retain"])
    c.data.max_length, c.data.cache_dir = 32, str(setup["cache"])
    c.evaluation.enabled = False
    c.train.micro_batch_size, c.train.grad_accum_steps, c.optim.lr = 4, 2, 1e-3
    c.mesh.fsdp, c.mesh.tensor = 4, 2
    for key, value in fields.items():
        section, field = key.split("__")
        c[section][field] = value
    return unlearn(c, workdir)


@pytest.mark.slow
def test_the_commands_modules_import_together_and_each_still_has_its_flags():
    """The commands' modules are libraries too (``evaluate``, ``run_comparison``, ``run_muse``): importing all of them
    into one process must not define ``--config`` twice, and each command still parses its own flags."""
    commands = ["main", "commands.unlearn", "commands.evaluate", "commands.plan", "commands.compare", "commands.muse"]
    code = "; ".join(f"import jaxunlearn.{c}" for c in commands) + "; print('imported')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]
    own = {"commands.plan": "--max_compiles", "commands.compare": "--world_seeds", "commands.muse": "--folds"}
    for command, flag in own.items():
        result = subprocess.run(
            [sys.executable, "-m", f"jaxunlearn.{command}", "--help"], capture_output=True, text=True, env=env
        )
        assert flag in result.stdout, (command, result.stderr[-2000:])  # absl exits 1 after --help


@pytest.mark.slow
def test_the_main_command_runs_a_config_and_says_where_it_wrote(setup, tmp_path):
    result = run_cli(setup, "ga_kl", tmp_path / "run", "--config.train.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 2 and record["method"] == "ga_kl"
    assert f"unlearned model: {tmp_path / 'run' / 'hf_model'}" in result.stdout
    assert f"run record:      {tmp_path / 'run' / 'run.json'}" in result.stdout


# The *_general configs differ from ga_gd / ga_kl only in their retain split, which this tiny setup replaces:
# their runs would repeat those two (tests/test_objectives.py checks their retain splits).
@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.endswith("_general")] + BEYOND)
@pytest.mark.slow
def test_each_config_runs_end_to_end(setup, tmp_path, config):
    unlearn_tiny(setup, config, tmp_path / "run", train__max_steps=2)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 2
    assert record["method"] == config.replace("_general", "")
    assert record["environment"]["versions"]["jax"] == importlib.metadata.version("jax")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert EXPECTED_METRICS[config] | {"loss", "grad_norm", "lr", "tokens_per_s"} == set(lines[-1]) - {"step", "split"}
    trains_retain = bool(EXPECTED_METRICS[config] & RETAIN_TERMS)
    assert (record["data"]["retain_chunks"] > 0) == trains_retain == record["needs"]["retain"]
    assert (tmp_path / "run" / "hf_model" / "model.safetensors").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.slow
def test_task_vector_exports_the_original_minus_alpha_times_the_fine_tuning_difference(setup, tmp_path):
    """The same fine-tuning (alpha does not change training) exported with alpha 1 and 2: theta_2 - theta_0 =
    2 (theta_1 - theta_0) for every tensor, theta_1 != theta_0, and the fine-tuned copy itself is never exported."""
    original = load_file(setup["model"] / "model.safetensors")
    exported = {}
    for alpha in (1, 2):
        run = tmp_path / f"alpha{alpha}"
        unlearn_tiny(setup, "task_vector", run, train__max_steps=2, method__alpha=float(alpha))
        exported[alpha] = load_file(run / "hf_model" / "model.safetensors")
    assert set(exported[1]) == set(original)
    moved = 0
    for name, theta0 in original.items():
        d1, d2 = exported[1][name] - theta0, exported[2][name] - theta0
        np.testing.assert_allclose(d2, 2 * d1, atol=1e-6, err_msg=name)
        moved += bool(np.abs(d1).max() > 1e-5)
    assert moved == len(original)  # every tensor was fine-tuned, and negated


@pytest.mark.slow
def test_npo_with_a_retain_weight_trains_its_kl_term(setup, tmp_path):
    result = run_cli(setup, "npo", tmp_path / "run", "--config.train.max_steps=3", "--config.method.retain_weight=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["needs"]["retain"] and record["needs"]["reference_forwards"] == 2
    assert record["data"]["retain_chunks"] > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["retain_kl"] > 0  # the KL term really ran (step 1 has lr 0, step 2 moved the model)
    assert all(x["loss"] == pytest.approx(x["npo"] + 0.5 * x["retain_kl"], rel=1e-5) for x in lines)
    # Without a retain set it is refused: tests/test_config_rules.py, row npo-retain-weight-without-retain-set.


def test_oracle_of_another_architecture_is_refused_before_compute(setup, tmp_path):
    from tests.tiny_models import save_hf_model

    save_hf_model("llama_mha_untied", tmp_path / "other")  # the setup's model is llama_gqa_tied
    result = run_cli(
        setup,
        "ga",
        tmp_path / "run",
        "--config.evaluation.enabled=True",
        f"--config.evaluation.oracle_model={tmp_path / 'other'}",
        f"--config.data.approximate.path={setup['approximate']}",
        "--config.data.general.path=",
        "--config.data.eval_retain.path=",
    )
    assert result.returncode == 2
    assert "config.evaluation.oracle_model=" in result.stderr and "architecture differs" in result.stderr
    assert "evaluating" not in result.stderr and not (tmp_path / "run").exists()


def test_bad_config_key_is_named(setup, tmp_path):
    result = run_cli(setup, "ga", tmp_path / "run", "--config.optim.lrr=1e-5")
    assert result.returncode == 2
    assert "--config.optim.lrr: unknown config key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_config_value_is_named(setup, tmp_path):
    """A config error reaches the command line as one line naming the key, exit status 2, before any work. Each
    rule's own message is tested in process: tests/test_config_rules.py."""
    result = run_cli(setup, "ga_kl", tmp_path / "run", "--config.optim.lr=-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxunlearn: error: ")]
    assert errors == ["jaxunlearn: error: config.optim.lr=-1.0: must be > 0"], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# The uninterrupted run both kill tests compare with: ga_gd, 6 steps, a checkpoint every 2.
KILL_ARGS = ("--config.train.max_steps=6", "--config.checkpoint.every_steps=2")


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """The exported parameters of the uninterrupted run of ``KILL_ARGS`` (run once for both kill tests)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(setup, "ga_gd", run, *KILL_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(run / "hf_model" / "model.safetensors")


@pytest.mark.slow
def test_resume_after_hard_kill_gives_identical_parameters(setup, straight, tmp_path):
    args = KILL_ARGS
    killed = run_cli(setup, "ga_gd", tmp_path / "resumed", *args, env={"JAXUNLEARN_FAULT_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9  # SIGKILL after step 3: the step-2 checkpoint is the latest
    assert not (tmp_path / "resumed" / "hf_model").exists()
    resumed = run_cli(setup, "ga_gd", tmp_path / "resumed", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming ga_gd from step 2 of 6" in resumed.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 of the killed run is dropped, not repeated

    a = straight
    b = load_file(tmp_path / "resumed" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    # Same command once more: nothing left to do, nothing retrained.
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    again = run_cli(setup, "ga_gd", tmp_path / "resumed", *args)
    assert again.returncode == 0
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == lines

    # A different configuration in the same workdir is refused.
    changed = run_cli(setup, "ga_gd", tmp_path / "resumed", *args, "--config.optim.lr=5e-4")
    assert changed.returncode == 2
    assert "holds a run with a different configuration (config.optim.lr)" in changed.stderr


@pytest.mark.parametrize(
    "preset", ["builtin", "arxiv", "github", "books", "tofu", "tofu_forget01", "muse_news", "muse_books", "wmdp"]
)
def test_every_config_file_is_valid_in_every_preset(preset):
    from jaxunlearn.config import ConfigError, validate
    from jaxunlearn.config.files import config_files
    from jaxunlearn.methods.registry import METHODS
    from tests.tiny_models import load_config_file

    names = list(config_files())  # configs/*.py but its __init__.py
    # Every registered method has a config file, and every config file names a registered method.
    assert {load_config_file(n, preset).method.name for n in names} == set(METHODS)
    for name in names:
        config = load_config_file(name, preset)
        if preset != "builtin":  # the paper's presets take the model from the user
            config.model.path = "01-ai/Yi-6B"
        if name == "ga_gd_capped" and not config.data.approximate.path:  # WMDP has no unseen split to derive from
            with pytest.raises(ConfigError, match="forget_nll_cap_margin=0.5.*config.data.approximate.path"):
                validate(config)
            continue
        validate(config)  # raises ConfigError naming the key
        assert config.method.name == name.replace("_general", "").replace("_capped", "")
        assert config.data.retain.path.startswith("world:general") == (preset == "builtin" and "general" in name)


@pytest.mark.slow
def test_random_kills_then_reruns_end_bit_identical(setup, straight, tmp_path):
    """SIGKILL at random steps (after the step's checkpoint is complete, or at once, possibly in the middle of an
    asynchronous save, the final one included), then the same command until it finishes: every trial ends with
    the uninterrupted run's parameters, bit for bit, and every step logged once."""
    args = KILL_ARGS
    expected = straight
    rng = np.random.default_rng(2026)
    for trial in range(2):  # one kill, then two
        run = tmp_path / f"trial{trial}"
        kills = sorted(rng.choice(np.arange(1, 7), size=1 + trial % 2, replace=False))
        for step in kills:
            spec = f"{step}{'!' if rng.random() < 0.5 else ''}"
            killed = run_cli(setup, "ga_gd", run, *args, env={"JAXUNLEARN_FAULT_KILL_AFTER_STEP": spec})
            if killed.returncode == 0:  # a resumed run may start past the kill step: nothing to kill
                continue
            assert killed.returncode == -9, (spec, killed.stderr[-3000:])
        final = run_cli(setup, "ga_gd", run, *args)
        assert final.returncode == 0, final.stderr[-3000:]
        got = load_file(run / "hf_model" / "model.safetensors")
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"trial {trial}, kills {kills}: {name}")
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6], (trial, kills, steps)


def test_an_unexported_model_is_named_as_such_not_as_the_workdir(tmp_path):
    """``checkpoint.export=False``: the output names the checkpoints, and an export an earlier run left, rather than
    calling the workdir the unlearned model."""
    from jaxunlearn.commands.unlearn import model_line

    assert model_line({"hf_model": str(tmp_path / "hf_model")}, str(tmp_path)) == str(tmp_path / "hf_model")
    line = model_line({"hf_model": None}, str(tmp_path))
    assert line.startswith("not exported (checkpoint.export=False)") and str(tmp_path / "checkpoints") in line
    assert "earlier export" not in line
    (tmp_path / "hf_model").mkdir()
    assert f"{tmp_path / 'hf_model'} holds an earlier export" in model_line({"hf_model": None}, str(tmp_path))
