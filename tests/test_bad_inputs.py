"""Bad inputs end in one line naming the culprit and exit status 2, before any work, leaving no workdir behind."""

import json
import os
import subprocess
import sys
import types

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


# --- The catalogue of bad inputs (issue 26), in process: each one line and exit status 2 --------------------------
# A row is an action that does what the command line does with one bad input; it runs as the commands run it (a
# refusal raised outside a command's own handlers becomes one line too: jaxunlearn.commands.cli.run_command), and
# must end in exactly one "jaxunlearn: error: " line containing every fragment, with exit status 2.


class _Flag:
    """An absl flag holder: what the commands read of their flags."""

    def __init__(self, value, present=True):
        self.value, self.present = value, present


def _compare_args(tmp_path, **flags):
    from jaxunlearn.config import base_config

    values = {
        "config": base_config("ga"),
        "workdir": str(tmp_path / "compare"),
        "methods": ["ga"],
        "lr_multipliers": ["1"],
        "preset": "builtin",
        "world_seeds": [],
        **flags,
    }
    return types.SimpleNamespace(**{k: _Flag(v) for k, v in values.items()})


def _compare(**flags):
    def action(tmp_path, monkeypatch):
        from jaxunlearn.commands import compare

        compare.main(["compare"], _compare_args(tmp_path, **flags))

    return action


def _plan_max_compiles(tmp_path, monkeypatch):
    from jaxunlearn.commands import plan

    plan.main(["plan"], types.SimpleNamespace(topology=_Flag("v5e-16"), max_compiles=_Flag(-1)))


def _parse(*argv, config_flag=True):
    """``cli.parse_flags`` on a fresh set of flags with the commands' ``--config``."""

    def action(tmp_path, monkeypatch):
        from absl import flags
        from ml_collections import config_flags

        from jaxunlearn.commands import cli

        fresh = flags.FlagValues()
        if config_flag:
            config_flags.DEFINE_config_file("config", None, "config", flag_values=fresh, lock_config=True)
        monkeypatch.setattr(flags, "FLAGS", fresh)
        (tmp_path / "not_a_config.py").write_text("x = 1\n")  # no get_config()
        monkeypatch.chdir(tmp_path)
        cli.parse_flags(["prog", *argv])

    return action


def _cpu_devices(value):
    def action(tmp_path, monkeypatch):
        from jaxunlearn.parallel import cpu_devices

        monkeypatch.setenv(cpu_devices.ENV, value)
        monkeypatch.setenv("XLA_FLAGS", "")
        cpu_devices.configure()

    return action


def _chat_template_without_one(tmp_path, monkeypatch):
    from jaxunlearn.data import qa
    from tests.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    assert not getattr(tokenizer, "chat_template", None)
    qa.question_answer_ids(tokenizer, "chat:You are a helpful assistant.", "Who?", "Me.")


def _answers(*answers):
    def action(tmp_path, monkeypatch):
        from jaxunlearn.data import DocumentSource, load_chunks
        from tests.tiny_models import make_tokenizer

        path = tmp_path / "qa.jsonl"
        path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": a}) + "\n" for i, a in enumerate(answers)))
        source = DocumentSource(label="forget", path=str(path), question="question")
        load_chunks(source, make_tokenizer(), 32, cache_dir="")

    return action


def _nested_json(name):
    """A data file or a model's config.json nested too deeply for Python's JSON parser (a RecursionError)."""

    def action(tmp_path, monkeypatch):
        from jaxunlearn.data import DocumentSource, load_documents
        from jaxunlearn.models.hf_checkpoint import read_hf_config

        path = tmp_path / name
        path.write_text("[" * 200_000 + "\n")
        if name == "config.json":
            read_hf_config(tmp_path)
        load_documents(DocumentSource(label="forget", path=str(path)))

    return action


def _lora(**fields):
    """A config with ``lora`` settings, validated as the main command does before any work."""

    def action(tmp_path, monkeypatch):
        from jaxunlearn.config import base_config, validate

        config = base_config("ga_kl")
        config.lora.update(fields)
        validate(config)

    return action


CATALOGUE = [
    pytest.param(_lora(rank=-1), ("config.lora.rank=-1: >= 0",), id="lora-rank"),
    pytest.param(_lora(rank=8, dropout=0.1), ("config.lora.dropout=0.1: only 0",), id="lora-dropout"),
    pytest.param(_lora(rank=8, targets="(q"), ("config.lora.targets='(q': not a regular expression",), id="lora-regex"),
    pytest.param(_lora(rank=8, base_dtype="int4"), ("config.lora.base_dtype='int4': one of",), id="lora-dtype"),
    pytest.param(
        _plan_max_compiles, ("--max_compiles=-1: give a number of compilations >= 1",), id="plan-max-compiles"
    ),
    pytest.param(_compare(world_seeds=["-1"]), ("--world_seeds=-1: give integers >= 0",), id="compare-world-seed"),
    pytest.param(_compare(lr_multipliers=["1", "abc"]), ("--lr_multipliers=1,abc: give numbers > 0",), id="compare-lr"),
    pytest.param(_compare(lr_multipliers=["1", "0"]), ("--lr_multipliers=1,0: give numbers > 0",), id="compare-lr-0"),
    pytest.param(_compare(methods=[]), ("--methods is empty: give at least one of the configs", "ga_kl"), id="methods"),
    pytest.param(
        _parse("--config=nope.py", "--config.train.max_steps=3"),
        ("--config=nope.py: cannot load it (No such file or directory: 'nope.py')", "ga_kl"),
        id="config-file-missing",
    ),
    pytest.param(
        _parse("--config=not_a_config.py"),
        ("--config=not_a_config.py: the file has no get_config() function",),
        id="config-file-without-get-config",
    ),
    pytest.param(
        _parse("--config.train.max_steps=3"),
        ("--config.train.max_steps: an override needs --config=CONFIG",),
        id="override-without-config",
    ),
    *[
        pytest.param(_cpu_devices(v), (f"JAXUNLEARN_CPU_DEVICES='{v}': a number of CPU devices >= 1",), id=f"cpus-{v}")
        for v in ("abc", "0", "-1")
    ],
    pytest.param(
        _chat_template_without_one,
        ("config.data.qa_template='chat:You are a helpful assistant.': the tokenizer has no chat template",),
        id="chat-template-without-one",
    ),
    pytest.param(_nested_json("forget.jsonl"), ("data.forget:", "forget.jsonl:1 is not valid JSON"), id="deep-jsonl"),
    pytest.param(_nested_json("forget.json"), ("data.forget:", "forget.json is not valid JSON"), id="deep-json"),
    pytest.param(_nested_json("config.json"), ("config.json is not valid JSON: maximum recursion",), id="deep-config"),
    pytest.param(
        _answers("", " ", None),
        ("data.forget:", "qa.jsonl", "every answer (column 'answer') is empty"),
        id="answers-all-empty",
    ),
]


@pytest.mark.parametrize(("action", "fragments"), CATALOGUE)
def test_bad_input_is_one_line(action, fragments, tmp_path, monkeypatch, capsys):
    from jaxunlearn.commands.cli import fail, refusals

    with pytest.raises(SystemExit) as exited:
        try:
            action(tmp_path, monkeypatch)
        except refusals() as e:  # as jaxunlearn.commands.cli.run_command reports it
            fail(str(e))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("jaxunlearn: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "compare").exists()  # nothing written


def test_empty_answers_among_others_are_dropped_with_a_warning(tmp_path, caplog):
    from jaxunlearn.data import DocumentSource, load_chunks
    from tests.tiny_models import make_tokenizer

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": a}) + "\n" for i, a in enumerate(["x", ""])))
    chunks = load_chunks(DocumentSource("forget", str(path), question="question"), make_tokenizer(), 32, cache_dir="")
    assert chunks.num_documents == 1
    assert "1 of 2 answers are empty; those pairs are dropped" in caplog.text


def test_a_refusal_outside_a_commands_handlers_is_one_line(tmp_path):
    """What the commands share (jaxunlearn.commands.cli.run_command), through the real command line: e.g.
    JAXUNLEARN_CPU_DEVICES=abc, read by ``cpu_devices.configure`` before a command's own ``try``."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "JAXUNLEARN_CPU_DEVICES": "abc"}
    result = subprocess.run(
        [sys.executable, "-m", "jaxunlearn.main", "--config=ga", f"--workdir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    _refused(result, "JAXUNLEARN_CPU_DEVICES='abc': a number of CPU devices >= 1")
    assert not (tmp_path / "run").exists()


# --- Damaged caches (issue 26): a cached evaluation or the world's manifest that cannot be read is recomputed ------


def _nested(path):
    path.write_text("[" * 200_000)


def _directory(path):
    path.mkdir()
    (path / "x").write_text("")


@pytest.mark.parametrize("damage", [_nested, _directory], ids=["deeply-nested-json", "directory-in-the-way"])
def test_a_damaged_cached_evaluation_is_recomputed_and_leaves_nothing_half_written(damage, tmp_path, caplog):
    from jaxunlearn.evaluation.runner import ResultCache

    cache = ResultCache(tmp_path)
    damage(cache.path("perplexity", "k"))
    assert cache.read("perplexity", "k") is None
    assert "ignoring the damaged cached evaluation" in caplog.text
    cache.write("perplexity", "k", {"forget": 1.0})  # a directory in the way: a warning, the result still reported
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    if damage is _nested:
        assert cache.read("perplexity", "k") == {"forget": 1.0}
    else:
        assert "cannot cache the evaluation in" in caplog.text


@pytest.mark.parametrize("damage", [_nested, _directory], ids=["deeply-nested-json", "directory-in-the-way"])
def test_a_damaged_world_manifest_means_rebuild(damage, tmp_path, caplog):
    from jaxunlearn.world.build import verify

    damage(tmp_path / "manifest.json")
    assert verify(tmp_path) is None
    assert "is incomplete or unreadable" in caplog.text


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path):
    from jaxunlearn.storage.files import write_json

    (tmp_path / "run.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_json(tmp_path / "run.json", {"status": "running"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
