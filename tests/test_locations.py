"""Paths as URLs: ``gs://``/``s3://``/``az://`` and ``file://`` for the workdir, the model, the data and the
caches. ``file://`` goes through the same staging and mirroring code as a bucket, so the whole main command runs
on URLs offline and must give what it gives on plain paths."""

import collections
import contextlib
import importlib
import json
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.spec import AbstractBufferedFile
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


# --- fetching in parallel from a slow store ----------------------------------------------------------------


class SlowStore(fsspec.AbstractFileSystem):
    """A gs:// store over a local directory (``gs://BUCKET/PATH`` is ``root/BUCKET/PATH``) that, as gcsfs, lists
    with ``ls``, stats with ``info`` and reads files with ranged requests; each request takes ``latency`` seconds
    plus its bytes at ``bandwidth`` bytes/s. It records the requests: how many were in flight at most, which
    ranges of which file were read. Reads of a file whose path ends with ``fail`` fail."""

    protocol = ("gs", "gcs")
    cachable = False
    root: Path
    latency = 0.0
    bandwidth = math.inf
    fail: str | None = None
    stale: dict[str, tuple[int, float]] = {}  # path: (size, mtime) its next info gives, as before a change
    lock = threading.Lock()
    in_flight = max_in_flight = requests = 0
    reads: collections.Counter  # ranged reads per path
    starts: collections.defaultdict  # the offsets each path was read from

    @classmethod
    def reset(cls, root: Path, latency: float = 0.0, bandwidth: float = math.inf) -> None:
        cls.root, cls.latency, cls.bandwidth, cls.fail, cls.stale = root, latency, bandwidth, None, {}
        cls.in_flight = cls.max_in_flight = cls.requests = 0
        cls.reads, cls.starts = collections.Counter(), collections.defaultdict(set)

    @classmethod
    @contextlib.contextmanager
    def request(cls, size: int = 0):
        with cls.lock:
            cls.in_flight += 1
            cls.requests += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            time.sleep(cls.latency + size / cls.bandwidth)
            yield
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def _entry(self, name: str, local: Path) -> dict:
        stat = local.stat()
        kind = "directory" if local.is_dir() else "file"
        return {"name": name, "type": kind, "size": 0 if kind == "directory" else stat.st_size, "mtime": stat.st_mtime}

    def info(self, path, **kwargs):
        name = self._strip_protocol(path)
        with self.request():
            if not (self.root / name).exists():
                raise FileNotFoundError(path)
            entry = self._entry(name, self.root / name)
            if name in self.stale:
                entry["size"], entry["mtime"] = self.stale.pop(name)
            return entry

    def ls(self, path, detail=True, **kwargs):
        name = self._strip_protocol(path)
        with self.request():
            local = self.root / name
            if not local.exists():
                raise FileNotFoundError(path)
            children = sorted(local.iterdir()) if local.is_dir() else [local]
            entries = [self._entry(f"{name}/{c.name}" if c != local else name, c) for c in children]
        return entries if detail else [e["name"] for e in entries]

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        assert mode == "rb", "a fetch only reads"
        return _SlowFile(self, self._strip_protocol(path), mode, block_size=block_size or "default", **kwargs)


class _SlowFile(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        store = type(self.fs)
        with store.request(end - start):
            if store.fail and self.path.endswith(store.fail):
                raise ConnectionError(f"503 Service Unavailable reading {self.path}")
            with open(store.root / self.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        with store.lock:
            store.reads[self.path] += 1
            store.starts[self.path].add(start)
        return data


@contextlib.contextmanager
def slow_store(root: Path, latency: float = 0.0, bandwidth: float = math.inf):
    """gs:// URLs served by :class:`SlowStore` over ``root`` while the block runs (no gcsfs needed)."""
    registry = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is the read-only view)
    saved = {k: registry.get(k) for k in ("gs", "gcs")}
    required, reached = locations._require_client, set(locations._reached)
    SlowStore.reset(root, latency, bandwidth)
    registry.update(gs=SlowStore, gcs=SlowStore)
    locations._require_client = lambda *a: None
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield SlowStore
    finally:
        for k, v in saved.items():
            if v is None:
                registry.pop(k, None)
            else:
                registry[k] = v
        locations._require_client = required
        locations._reached.clear()
        locations._reached.update(reached)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(locations.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(locations.THREADS_ENV, raising=False)
    (tmp_path / "gcs" / "bucket").mkdir(parents=True)
    with slow_store(tmp_path / "gcs", latency=0.01) as store:
        yield store


def _tree(root: Path, n: int, seed: int = 0) -> dict[str, bytes]:
    """``n`` files of random bytes (some in a subdirectory, one empty) under ``root``; returns their contents."""
    rng = np.random.default_rng(seed)
    files = {f"{'sub/' if i % 3 == 0 else ''}f{i:02d}.bin": rng.bytes(int(rng.integers(0, 3000))) for i in range(n)}
    files["empty.txt"] = b""
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return files


def _mirrored(local: Path) -> dict[str, bytes]:
    """The mirror's files, without its manifest."""
    return {
        p.relative_to(local).as_posix(): p.read_bytes()
        for p in local.rglob("*")
        if p.is_file() and p.name != ".jaxunlearn-mirror.json"
    }


def test_a_parallel_fetch_mirrors_a_tree_and_follows_changes(store):
    """Through a gs:// store listed and read as gcsfs does (directories named without the scheme): the bytes of
    every file, the manifest of (size, mtime), then only the changed file copied again and the deleted one gone."""
    model = store.root / "bucket" / "model"
    files = _tree(model, 12)
    local = Path(locations.fetch.__wrapped__("gs://bucket/model", "model"))
    assert local == Path(os.environ[locations.CACHE_ENV]) / "remote" / "gs" / "bucket" / "model"
    assert _mirrored(local) == files
    manifest = json.loads((local / ".jaxunlearn-mirror.json").read_text())
    assert manifest == {r: [len(d), int((model / r).stat().st_mtime)] for r, d in files.items()}

    inode = {r: (local / r).stat().st_ino for r in files}  # a copy replaces the file: a new inode
    changed = b"x" * len(files["f01.bin"])  # same size: only the modification time tells
    (model / "f01.bin").write_bytes(changed)
    os.utime(model / "f01.bin", (time.time() + 10, time.time() + 10))
    (model / "sub" / "f03.bin").unlink()
    store.reads.clear()
    locations.fetch.__wrapped__("gs://bucket/model", "model")
    assert _mirrored(local) == {**{r: d for r, d in files.items() if r != "sub/f03.bin"}, "f01.bin": changed}
    assert set(store.reads) == {"bucket/model/f01.bin"}  # the unchanged files were not read again
    assert [r for r in files if r != "sub/f03.bin" and (local / r).stat().st_ino != inode[r]] == ["f01.bin"]
    assert "sub/f03.bin" not in json.loads((local / ".jaxunlearn-mirror.json").read_text())


def test_transfers_overlap_up_to_the_thread_setting(store, monkeypatch, tmp_path):
    """The requests in flight at once, counted by the store: one at a time with 1 thread, 4 with 4, more than
    4 and at most 16 by default (not a timing: each request lasts 20 ms, plenty to overlap)."""
    _tree(store.root / "bucket" / "model", 32)
    for threads in ("1", "4", None):
        if threads:
            monkeypatch.setenv(locations.THREADS_ENV, threads)
        else:
            monkeypatch.delenv(locations.THREADS_ENV)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        store.reset(store.root, latency=0.02)
        locations.fetch.__wrapped__("gs://bucket/model", "model")
        if threads:
            assert store.max_in_flight == int(threads)
        else:
            assert 4 < store.max_in_flight <= locations.DEFAULT_THREADS == 16


def test_a_large_file_is_fetched_in_ranges_that_reassemble_it(store, monkeypatch):
    data = np.random.default_rng(1).bytes(10_007)
    (store.root / "bucket" / "ckpt").mkdir()
    (store.root / "bucket" / "ckpt" / "model.safetensors").write_bytes(data)
    (store.root / "bucket" / "ckpt" / "config.json").write_text("{}")
    monkeypatch.setattr(locations, "CHUNK_SIZE", 1000)
    local = Path(locations.fetch.__wrapped__("gs://bucket/ckpt", "model"))
    assert (local / "model.safetensors").read_bytes() == data
    assert store.starts["bucket/ckpt/model.safetensors"] == set(range(0, 10_007, 1000))  # 11 ranged reads
    assert store.starts["bucket/ckpt/config.json"] == {0}

    single = Path(locations.fetch.__wrapped__("gs://bucket/ckpt/model.safetensors", "model"))  # a file URL
    assert single.read_bytes() == data and single.is_file()


def test_a_failed_transfer_names_the_file_and_leaves_nothing_partial(store, monkeypatch):
    files = _tree(store.root / "bucket" / "model", 8)
    big = np.random.default_rng(2).bytes(5000)
    (store.root / "bucket" / "model" / "big.bin").write_bytes(big)
    monkeypatch.setattr(locations, "CHUNK_SIZE", 1000)
    store.fail = "f04.bin"
    with pytest.raises(locations.LocationError) as failed:
        locations.fetch.__wrapped__("gs://bucket/model", "model")
    message = str(failed.value)
    assert message.startswith("model=gs://bucket/model: copying gs://bucket/model/f04.bin failed (ConnectionError: ")
    assert "503 Service Unavailable" in message and "\n" not in message
    local = Path(os.environ[locations.CACHE_ENV]) / "remote" / "gs" / "bucket" / "model"
    names = [p.name for p in local.rglob("*")]
    assert not [n for n in names if "partial" in n] and "f04.bin" not in names
    assert ".jaxunlearn-mirror.json" not in names  # nothing is trusted: the next fetch copies anew

    store.fail = None
    locations.fetch.__wrapped__("gs://bucket/model", "model")
    assert _mirrored(local) == {**files, "big.bin": big}


@pytest.mark.parametrize("ranges", [1, 5])
def test_a_file_that_changes_while_it_is_copied_is_not_kept(ranges, store, monkeypatch):
    """The store's file changed between the stat that the manifest would record and the copy: it grew (one
    range: more bytes than the stat said), or its modification time moved (several ranges: they could mix two
    versions)."""
    data = np.random.default_rng(3).bytes(5000)
    (store.root / "bucket" / "model").mkdir()
    (store.root / "bucket" / "model" / "w.bin").write_bytes(data)
    monkeypatch.setattr(locations, "CHUNK_SIZE", 5000 // ranges)
    mtime = (store.root / "bucket" / "model" / "w.bin").stat().st_mtime
    store.stale["bucket/model/w.bin"] = (4000, mtime) if ranges == 1 else (5000, mtime - 60)
    with pytest.raises(locations.LocationError, match="w.bin (is longer than its 4000 bytes|changed while being c)"):
        locations.fetch.__wrapped__("gs://bucket/model", "model")
    local = Path(os.environ[locations.CACHE_ENV]) / "remote" / "gs" / "bucket" / "model"
    assert not [p for p in local.rglob("*") if p.is_file()]


def test_a_partial_file_a_killed_fetch_left_is_never_trusted(store):
    files = _tree(store.root / "bucket" / "model", 4)
    local = Path(locations.fetch.__wrapped__("gs://bucket/model", "model"))
    (store.root / "bucket" / "model" / "f01.bin").write_bytes(b"new contents")
    (local / ".f01.bin.partial-999999").write_bytes(b"new")  # a fetch killed mid-copy, its manifest not written
    locations.fetch.__wrapped__("gs://bucket/model", "model")
    assert _mirrored(local) == {**files, "f01.bin": b"new contents"}


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5"])
def test_a_bad_thread_setting_is_refused_before_any_work(value, store, monkeypatch):
    monkeypatch.setenv(locations.THREADS_ENV, value)
    (store.root / "bucket" / "f.jsonl").write_text("{}")
    for call in (locations.check, locations.fetch.__wrapped__):
        with pytest.raises(locations.LocationError, match=rf"^JAXUNLEARN_FETCH_THREADS={value}: must be a whole"):
            call("gs://bucket/f.jsonl", "config.data.forget.path")
    assert not (Path(os.environ[locations.CACHE_ENV]) / "remote").exists()


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
