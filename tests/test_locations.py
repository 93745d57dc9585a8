"""Paths as URLs: ``gs://``/``s3://``/``az://`` and ``file://`` for the workdir, the model, the data and the
caches. ``file://`` goes through the same staging and mirroring code as a bucket, so the whole main command runs
on URLs offline and must give what it gives on plain paths."""

import json
import os
import subprocess

import numpy as np
import pytest
from etils import epath
from safetensors.numpy import load_file

from jaxunlearn.storage import locations
from tests.test_cli import REPO, run_cli_args
from tests.tiny_models import write_tiny_setup


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gs://bucket/runs/a/", "gs://bucket/runs/a"),
        ("s3://my-bucket/x", "s3://my-bucket/x"),
        ("file:///tmp/run", "/tmp/run"),
        ("file://localhost/tmp/run", "/tmp/run"),
        ("file:///tmp/%C3%BCber%20uns", "/tmp/\u00fcber uns"),  # percent-escapes decoded, as RFC 8089 file URIs
    ],
)
def test_urls_become_store_paths(text, expected, monkeypatch):
    monkeypatch.setattr(locations, "_require_client", lambda *a: None)  # no gcsfs/s3fs needed to name a path
    path = locations.remote(text, "--workdir")
    assert isinstance(path, epath.Path) and os.fspath(path) == expected


@pytest.mark.parametrize("text", ["runs/a", "/abs/run", "~/run", "01-ai/Yi-6B", "world:target", "shapes:yi-6b", ""])
def test_local_paths_hub_ids_and_names_are_not_urls(text):
    assert locations.remote(text, "x") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gs:/bucket/run", "malformed URL; write gs://BUCKET/PATH"),
        ("gs:bucket/run", "malformed URL; write gs://BUCKET/PATH"),
        ("gs://", "'' is not a bucket"),
        ("gs://Bad_Bucket/x", "'Bad_Bucket' is not a bucket"),
        ("file://host/tmp/x", "write file:///ABSOLUTE/PATH"),
        ("file://", "write file:///ABSOLUTE/PATH"),
        ("http://example.com/x", "unsupported URL scheme http://"),
        ("memory://x/y", "unsupported URL scheme memory://"),
    ],
)
def test_urls_that_cannot_work_are_refused_naming_the_setting(text, message):
    with pytest.raises(locations.LocationError) as e:
        locations.remote(text, "--workdir")
    assert str(e.value).startswith(f"--workdir={text}: ") and message in str(e.value)


def test_a_missing_storage_client_is_named(monkeypatch):
    monkeypatch.setattr(locations.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(locations.LocationError, match=r"gs:// needs the gcsfs package .*pip install gcsfs"):
        locations.remote("gs://bucket/run", "--workdir")


def test_fetch_mirrors_a_directory_and_follows_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXUNLEARN_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store" / "model"
    (store / "sub").mkdir(parents=True)
    (store / "config.json").write_text("{}")
    (store / "sub" / "w.bin").write_bytes(b"1234")
    local = locations.fetch.__wrapped__(f"file://{store}", "model")
    assert local.startswith(str(tmp_path / "cache" / "remote" / "file"))
    assert (epath.Path(local) / "sub" / "w.bin").read_bytes() == b"1234"
    (store / "sub" / "w.bin").write_bytes(b"123456")  # changed in the store: copied again
    (store / "config.json").unlink()  # gone from the store: gone from the mirror
    assert locations.fetch.__wrapped__(f"file://{store}", "model") == local
    assert (epath.Path(local) / "sub" / "w.bin").read_bytes() == b"123456"
    assert not (epath.Path(local) / "config.json").exists()
    with pytest.raises(locations.LocationError, match="not found"):
        locations.fetch.__wrapped__(f"file://{tmp_path}/nothing", "model")


def _run(args, cache):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "JAXUNLEARN_CACHE": str(cache)}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_main_on_file_urls_gives_what_it_gives_on_paths(tmp_path):
    """Workdir, model, data and cache as ``file://`` URLs (staged and mirrored, as a bucket would be) against
    the same run on plain paths: the same trained weights, losses and report; the URL's directory holds the
    whole run; the same command again finds it finished; evaluate reads the run at its URL."""
    setup = {**write_tiny_setup(tmp_path), "cache": tmp_path / "cache"}
    extra = [
        "--config.train.max_steps=2",
        "--config.checkpoint.every_steps=1",
        "--config.evaluation.enabled=True",
        f"--config.data.approximate.path={setup['approximate']}",
        "--config.data.general.path=",
        "--config.data.eval_retain.path=",
        "--config.evaluation.oracle_model=",
        "--config.evaluation.verbatim.max_chunks=4",
    ]
    local = _run(run_cli_args(setup, "ga_gd", tmp_path / "local", *extra), tmp_path / "home-a")
    assert local.returncode == 0, local.stderr[-3000:]

    urls = {k: f"file://{v}" for k, v in setup.items()}
    url_run = run_cli_args(urls, "ga_gd", f"file://{tmp_path}/bucket/run", *extra)
    remote = _run(url_run, tmp_path / "home-b")
    assert remote.returncode == 0, remote.stderr[-3000:]
    run_dir = tmp_path / "bucket" / "run"
    assert f"report:          {run_dir / 'report.md'}" in remote.stdout
    a, b = (load_file(d / "hf_model" / "model.safetensors") for d in (tmp_path / "local", run_dir))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (tmp_path / "local", run_dir)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    reports = [json.loads((d / "report.json").read_text())["models"] for d in (tmp_path / "local", run_dir)]
    assert reports[0] == reports[1]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["hf_model"] == str(run_dir / "hf_model")
    assert {"log.txt", "report.md", "checkpoints", "hf_model"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / ".jaxunlearn.lock.json").exists()  # the lock is the directory's own: a path sees it too
    assert (tmp_path / "home-b" / "remote" / "file").is_dir()  # the inputs were read from the mirror

    again = _run(url_run, tmp_path / "home-c")  # another machine: nothing staged or mirrored there yet
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 2" in again.stderr
    assert load_file(run_dir / "hf_model" / "model.safetensors").keys() == a.keys()

    evaluate = [
        *url_run[:2],
        "jaxunlearn.commands.evaluate",
        *[a for a in url_run[3:] if a.startswith("--config")],
        f"--model=file://{run_dir}",
        f"--workdir=file://{tmp_path}/bucket/eval",
    ]
    evaluated = _run(evaluate, tmp_path / "home-c")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "bucket" / "eval" / "report.json").read_text())["models"]["model"]
    assert report["perplexity"]["forget"] == reports[1]["unlearned"]["perplexity"]["forget"]


def test_a_malformed_workdir_url_is_refused_before_any_work(tmp_path):
    setup = {**write_tiny_setup(tmp_path), "cache": tmp_path / "cache"}
    result = subprocess.run(
        run_cli_args(setup, "ga", "gs:/bucket/run"),
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "jaxunlearn: error: --workdir=gs:/bucket/run: malformed URL; write gs://BUCKET/PATH"
    ]
    assert not (tmp_path / "gs:").exists()
