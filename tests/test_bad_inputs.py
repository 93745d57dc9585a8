"""Bad inputs end in one line naming the culprit and exit status 2, before any work, leaving no workdir behind."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_cli import REPO, run_cli
from tests.tiny_models import write_tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return {**write_tiny_setup(root), "cache": root / "cache", "root": root}


def _refused(result, *fragments):
    """Exit status 2, exactly one line on stderr, no traceback, every fragment in that line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("jaxunlearn: error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(errors) == 1, lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _main(*args, cwd=REPO):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "jaxunlearn.main", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_missing_config_file_and_bad_preset(tmp_path):
    result = _main("--config=configs/nope.py", f"--workdir={tmp_path / 'run'}")
    _refused(result, "--config=configs/nope.py: cannot load it", "No such file or directory")
    result = _main("--config=configs/ga.py:foo", f"--workdir={tmp_path / 'run'}")
    _refused(result, "--config", "preset 'foo': choose one of builtin, arxiv, github")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_undecodable_jsonl_is_refused_with_file_and_offset(setup, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    result = run_cli(setup, "ga", tmp_path / "run", f"--config.data.forget.path={bad}")
    _refused(result, "data.forget:", str(bad), "not UTF-8", "byte offset 28")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_corrupt_parquet_is_refused(setup, tmp_path):
    path = tmp_path / "forget.parquet"
    pq.write_table(pa.table({"text": ["a document"] * 20}), path)
    path.write_bytes(path.read_bytes()[:-30])  # footer cut off
    result = run_cli(setup, "ga", tmp_path / "run", f"--config.data.forget.path={path}")
    _refused(result, "data.forget:", str(path), "not a readable Parquet file")
    assert not (tmp_path / "run").exists()


def test_truncated_safetensors_is_refused_before_any_work(setup, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli(setup, "ga", tmp_path / "run", f"--config.model.path={model}")
    _refused(result, str(weights), "not a readable safetensors file")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_model_without_tokenizer_names_the_config_key(setup, tmp_path):
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(setup["model"] / name, model / name)
    result = run_cli(setup, "ga", tmp_path / "run", f"--config.model.path={model}")
    _refused(result, str(model), "config.model.tokenizer")
    assert not (tmp_path / "run").exists()


def test_builtin_preset_with_ones_own_model_is_refused_before_building_anything(setup, tmp_path):
    env = {**os.environ, "JAXUNLEARN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxunlearn.main",
            f"--config={REPO / 'configs' / 'ga.py'}",
            f"--workdir={tmp_path / 'run'}",
            f"--config.model.path={setup['model']}",
        ],
        capture_output=True,
        text=True,
        env={**env, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=300,
    )
    _refused(result, "config.model.path=", "configs/ga_kl.py:arxiv", "config.evaluation.oracle_model")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no world was built


def test_export_target_that_is_a_link_is_refused_before_training(setup, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (run / "hf_model").symlink_to(tmp_path / "elsewhere")
    result = run_cli(setup, "ga", run, "--config.train.max_steps=1")
    _refused(result, str(run / "hf_model"), "symbolic link")
    assert sorted(p.name for p in run.iterdir()) == ["hf_model"]  # nothing trained, nothing written


def test_rmu_settings_the_model_cannot_take_are_refused_before_any_work(setup, tmp_path):
    """RMU's steered layer and trainable-parameter pattern are checked against the model (3 layers here)."""
    result = run_cli(setup, "rmu", tmp_path / "run", "--config.method.layer=3")
    _refused(result, "config.method.layer=3: the model has layers 0 to 2")
    assert not (tmp_path / "run").exists()

    from jaxunlearn.config import ConfigError, base_config
    from jaxunlearn.models import ModelConfig
    from jaxunlearn.models.hf_checkpoint import read_hf_config
    from jaxunlearn.run.prepare import check_method

    model_config = ModelConfig.from_hf(read_hf_config(setup["model"]))
    method = base_config("rmu", preset="arxiv").method
    method.layer = 1
    method.trainable_params = r"model\.layers\.2\.mlp\.down_proj\.weight"  # after the steered layer: no gradient
    with pytest.raises(ConfigError, match="matches no parameter in layers 0 to 1"):
        check_method(method, model_config)
    method.trainable_params = "model.layers.(0"
    with pytest.raises(ConfigError, match="not a regular expression"):
        check_method(method, model_config)
    method.trainable_params = r"model\.embed_tokens\.weight"  # the embedding is reached
    check_method(method, model_config)


def test_attacks_add_to_their_metrics_options_and_need_their_data():
    """An unknown attack is refused in tests/test_config_rules.py (row unknown-attack)."""
    from jaxunlearn.config import ConfigError, base_config, validate
    from jaxunlearn.evaluation.settings import metric_options

    config = base_config("ga", preset="arxiv")
    config.model.path = "01-ai/Yi-6B"
    config.evaluation.attacks = "relearn_related, nf4"
    config.evaluation.quantization.schemes = "int8"
    assert metric_options(config.evaluation, "quantization")["schemes"] == "int8,nf4"
    assert metric_options(config.evaluation, "relearning")["corpora"] == "retain"
    validate(config)
    config.data.retain.path = ""
    with pytest.raises(ConfigError, match="config.data.retain.path=''.*relearning on related text"):
        validate(config)
    config = base_config("ga", preset="arxiv")
    config.model.path = "01-ai/Yi-6B"
    config.evaluation.metrics = ("perplexity,mia",)  # what `--config.evaluation.metrics=perplexity,mia` gives
    with pytest.raises(ConfigError, match=r"'perplexity,mia' is not a metric.*a list on the command line"):
        validate(config)


@pytest.mark.slow
def test_unprepared_tfds_dataset_is_refused_before_any_work(setup, tmp_path):
    """A selection's syntax is checked with the config (tests/test_config_rules.py, rows tfds-*); whether the
    dataset is prepared is read with the data."""
    empty = tmp_path / "tensorflow_datasets"
    empty.mkdir()
    result = run_cli(
        setup,
        "ga",
        tmp_path / "run",
        "--config.data.forget.path=tfds:pg19:train[:50]",
        f"--config.data.forget.tfds_data_dir={empty}",
    )
    _refused(
        result,
        f"data.forget: tfds:pg19:train[:50]: no dataset 'pg19' is prepared in the TFDS data_dir {empty}",
        "tfds build pg19 --data_dir=DIR",
        "data.forget.tfds_data_dir",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compare_refuses_a_runs_bad_data_in_one_line(setup, tmp_path):
    """The experiment commands report a run's refusal as the main command does, not as a traceback."""
    empty = tmp_path / "forget.jsonl"
    empty.write_text("")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxunlearn.commands.compare",
            f"--config={REPO / 'configs' / 'ga.py'}:arxiv",
            "--preset=arxiv",
            "--methods=ga",
            "--lr_multipliers=1",
            f"--workdir={tmp_path / 'compare'}",
            f"--config.model.path={setup['model']}",
            f"--config.data.forget.path={empty}",
            f"--config.data.retain.path={setup['retain']}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=300,
    )
    _refused(result, "data.forget", str(empty))
    assert not [p for p in (tmp_path / "compare").rglob("*") if p.is_file()]  # no run record, no checkpoint
