"""The workdir against a hostile world (issue 26): one lock per place however it is spelled, the user's files never
replaced, a workdir that cannot be a directory, a full disk, and remote storage that does not answer. In process
where possible; the end-to-end runs are marked slow."""

import errno
import importlib
import json
import os
import subprocess
import sys
import time

import fsspec
import pytest
from etils.epath import backend as epath_backend

from jaxunlearn.run import logs
from jaxunlearn.run import workdir as workdir_module
from jaxunlearn.run.workdir import Workdir, WorkdirError
from jaxunlearn.storage import locations
from jaxunlearn.storage.locations import disk_full
from tests.test_cli import REPO, run_cli_args
from tests.tiny_models import write_tiny_setup


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(locations.CACHE_ENV, str(tmp_path / "cache"))  # staging directories of file:// workdirs


def _tree(root):
    """Every file and directory under ``root`` with its content, to show that nothing changed."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# --- the lock: one place, one lock ------------------------------------------------------------------------


def _spellings(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    return run, {
        "file-url": f"file://{run}",
        "file-url-trailing-slash": f"file://{run}/",
        "trailing-slash": f"{run}/",
        "dot-dot": f"{tmp_path}/runs/../runs/x",
        "symlink": f"{tmp_path}/link",
        "relative": os.path.relpath(run),
    }


SPELLINGS = ["file-url", "file-url-trailing-slash", "trailing-slash", "dot-dot", "symlink", "relative"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_url_and_every_spelling_of_one_directory_are_one_lock(spelling, tmp_path):
    run, spellings = _spellings(tmp_path)
    other = spellings[spelling]
    for holder, second in ((str(run), other), (other, str(run))):  # either way round
        with Workdir(holder).claimed():
            with pytest.raises(WorkdirError) as refused:
                with Workdir(second).claimed():
                    pytest.fail(f"{second} was claimed while {holder} held the lock")
        message = str(refused.value)
        assert "\n" not in message
        assert f"is in use by another jaxunlearn run (pid {os.getpid()} on " in message, message
    with Workdir(other).claimed():  # released: the next run takes it
        pass


# --- the user's files -------------------------------------------------------------------------------------


def _users_directory(tmp_path):
    users = tmp_path / "mine"
    (users / "hf_model").mkdir(parents=True)
    (users / "hf_model" / "README.md").write_text("# my model\n")
    (users / "run.json").write_text('{"name": "my experiment"}')
    (users / "metrics.jsonl").write_text('{"accuracy": 0.9}\n')
    return users


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_directory_with_the_users_files_is_refused_and_nothing_of_theirs_is_touched(as_url, tmp_path):
    users = _users_directory(tmp_path)
    before = _tree(users)
    for force in (False, True):  # the flag never lets a run replace one of the user's files
        with pytest.raises(WorkdirError) as refused:
            with Workdir(f"file://{users}" if as_url else users, force=force).claimed():
                pytest.fail("claimed a directory of the user's files")
        message = str(refused.value)
        assert "\n" not in message and "--workdir=" in message
        assert "holds files jaxunlearn did not write (hf_model, metrics.jsonl, run.json)" in message, message
        assert "would replace hf_model, metrics.jsonl, run.json" in message, message
        assert _tree(users) == before  # not even a lock file
    assert not (tmp_path / "cache" / "staging").exists() or not any((tmp_path / "cache" / "staging").iterdir())


def test_other_files_need_the_flag_and_stay_as_they_are(tmp_path):
    users = tmp_path / "project"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(WorkdirError, match=r"holds files jaxunlearn did not write \(notes.txt\).*--force_workdir"):
        with Workdir(users).claimed():
            pass
    assert _tree(users) == {"notes.txt": b"mine"}
    with Workdir(users, force=True).claimed() as wd:
        wd.accept({"config": {}, "method": "ga"})
        wd.finish("completed")
    assert (users / "notes.txt").read_text() == "mine"
    assert json.loads((users / "run.json").read_text())["status"] == "completed"
    with Workdir(users).claimed():  # from now on a jaxunlearn workdir: rerunning needs no flag
        pass


@pytest.mark.parametrize(
    "contents",
    [{}, {".jaxunlearn.lock": "", "checkpoints/": None}, {"run.json": '{"config": {}, "method": "ga", "status": "x"}'}],
    ids=["empty", "lock-and-empty-checkpoints", "a-jaxunlearn-run"],
)
def test_an_empty_directory_or_a_jaxunlearn_run_is_accepted(contents, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name, text in contents.items():
        (run / name).mkdir() if text is None else (run / name).write_text(text)
    before = {p.name: (p.read_text() if p.is_file() else None) for p in run.iterdir()}
    with Workdir(run).claimed():
        assert (run / ".jaxunlearn.lock").exists()  # claimed: the lock is held in the directory itself
    assert before == {
        p.name: (p.read_text() if p.is_file() else None) for p in run.iterdir() if p.name in before
    }  # nothing that was there is replaced


def test_the_outputs_list_names_what_a_run_writes():
    """Every top-level name a run writes must be in OUTPUTS, or a user's file of that name could be replaced."""
    for name in ("run.json", "log.txt", "metrics.jsonl", "tensorboard", "checkpoints", "hf_model", "report.md"):
        assert workdir_module._is_output(name)
    assert workdir_module._is_output("log.process3.txt") and not workdir_module._is_output("notes.txt")


# --- a workdir that cannot be a directory ------------------------------------------------------------------


@pytest.mark.parametrize("under", [False, True], ids=["a-file", "under-a-file"])
@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_file_or_a_path_under_a_file_is_refused_in_one_line_creating_nothing(under, as_url, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("data")
    place = afile / "run" if under else afile
    given = f"file://{place}" if as_url else str(place)
    before = _tree(tmp_path)
    with pytest.raises(WorkdirError) as refused:
        with Workdir(given).claimed():
            pytest.fail("claimed a file")
    message = str(refused.value)
    assert message.startswith(f"--workdir={given}: {afile} is a file") and "\n" not in message, message
    assert _tree(tmp_path) == before


def test_a_directory_that_cannot_be_made_is_one_line(tmp_path):
    with pytest.raises(WorkdirError, match=r"^--workdir=.*: cannot (use|create) it \(File name too long\)$"):
        with Workdir(tmp_path / ("x" * 300) / "run").claimed():
            pass
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root writes anyway)
            with pytest.raises(WorkdirError, match=r"--workdir=.*/ro/run: cannot create it \(Permission denied\)"):
                with Workdir(locked / "run").claimed():
                    pass
    finally:
        locked.chmod(0o700)
    assert "x" * 300 not in os.listdir(tmp_path) and not (locked / "run").exists()


# --- a full disk --------------------------------------------------------------------------------------------


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_recognised_however_it_is_wrapped():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            _enospc()
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as wrapped:
        assert disk_full(wrapped)
    assert disk_full(ValueError("tensorstore: [Errno 28] No space left on device"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_full_disk_stops_the_log_file_without_a_traceback_per_line(tmp_path, capfd):
    import io
    import logging

    logs.configure_logging()
    logs.attach_log_file(tmp_path)
    console = logging.StreamHandler(io.StringIO())  # another handler: it must still get every line
    logs.log.addHandler(console)
    level = logs.log.level
    logs.log.setLevel(logging.INFO)  # whatever an earlier test in this process left
    try:
        handler = next(h for h in logs.log.handlers if getattr(h, "baseFilename", None) == str(tmp_path / "log.txt"))
        handler.stream.write = _enospc
        for i in range(50):
            logs.log.info("step %d", i)
    finally:
        logs.detach_log_file()
        logs.log.removeHandler(console)
        logs.log.setLevel(level)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert "step 49" in console.stream.getvalue()


def test_run_json_records_a_full_disk(tmp_path, monkeypatch):
    with pytest.raises(OSError):
        with Workdir(tmp_path / "run").claimed() as wd:
            wd.accept({"config": {"seed": 0}, "method": "ga", "padding": "x" * 300})
            monkeypatch.setattr(workdir_module, "write_json", _enospc)  # no new file can be written any more
            _enospc()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["error"]


# A wrapper of the main command whose checkpoint saves fail with ENOSPC from step FULL_AT on.
_FULL_DISK_MAIN = """
import errno, os, sys
from jaxunlearn.storage import checkpoints
save = checkpoints.Checkpointer.save
def full(self, step, state, meta):
    if step >= int(os.environ["FULL_AT"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / str(step)))
    save(self, step, state, meta)
checkpoints.Checkpointer.save = full
from jaxunlearn.commands.unlearn import run
sys.argv[0] = "jaxunlearn"
run()
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_recorded_and_the_last_checkpoint_resumes(tmp_path):
    setup = {**write_tiny_setup(tmp_path), "cache": tmp_path / "cache"}
    run = tmp_path / "run"
    args = run_cli_args(setup, "ga", run, "--config.train.max_steps=4", "--config.checkpoint.every_steps=1")
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "FULL_AT": "3"}
    full = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_MAIN, *args[3:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("jaxunlearn: error: ")]
    assert len(errors) == 1 and "no space left on device" in errors[0] and str(run) in errors[0], full.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    again = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming ga from step 2 of 4" in again.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


# --- remote storage that does not answer ----------------------------------------------------------------------


class _Store(fsspec.AbstractFileSystem):
    """A gs:// store that refuses every request, hangs on it, or answers (``behaviour``)."""

    protocol = ("gs", "gcs")
    cachable = False
    behaviour = "refuse"

    def info(self, path, **kwargs):
        if self.behaviour == "hang":
            time.sleep(5)
        if self.behaviour in ("refuse", "hang"):
            raise ConnectionError("Cannot connect to host storage.googleapis.com:443 ssl:default [DNS failure]")
        return {"name": path, "type": "directory", "size": 0}

    def ls(self, path, detail=True, **kwargs):
        return []


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setattr(locations, "_require_client", lambda *a: None)  # no gcsfs needed: the fake is the client
    monkeypatch.setattr(locations, "_reached", set())
    registry = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is the read-only view)
    monkeypatch.setitem(registry, "gcs", _Store)
    monkeypatch.setitem(registry, "gs", _Store)
    monkeypatch.setenv(locations.TIMEOUT_ENV, "0.5")
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield _Store
    _Store.behaviour = "refuse"
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.mark.parametrize("behaviour", ["refuse", "hang"])
def test_storage_that_does_not_answer_is_one_line_in_bounded_time(behaviour, store):
    store.behaviour = behaviour
    start = time.monotonic()
    with pytest.raises(locations.LocationError) as refused:
        locations.check("gs://my-bucket/forget.jsonl", "config.data.forget.path")
    assert time.monotonic() - start < 3
    message = str(refused.value)
    assert message.startswith("config.data.forget.path=gs://my-bucket/forget.jsonl: ") and "\n" not in message
    if behaviour == "refuse":
        assert "cannot reach gs://my-bucket (ConnectionError: Cannot connect to host" in message, message
    else:
        assert "did not answer within 0.5 s (set JAXUNLEARN_STORAGE_TIMEOUT" in message, message


def test_validation_names_the_data_setting(store):
    from jaxunlearn.config.validation import check_locations
    from jaxunlearn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^config.data.forget.path=gs://my-bucket/f.jsonl: cannot reach gs://my-"):
        check_locations({"config.data.forget.path": "gs://my-bucket/f.jsonl"})


@pytest.mark.parametrize("behaviour", ["refuse", "hang"])
def test_a_workdir_in_storage_that_does_not_answer_leaves_nothing_behind(behaviour, store, tmp_path):
    store.behaviour = behaviour
    start = time.monotonic()
    with pytest.raises(locations.LocationError, match=r"^--workdir=gs://my-bucket/runs/x: "):
        with Workdir("gs://my-bucket/runs/x").claimed():
            pytest.fail("claimed an unreachable workdir")
    assert time.monotonic() - start < 3
    assert not (tmp_path / "cache").exists()  # no staging directory, no lock


def test_storage_that_answers_is_asked_once(store, monkeypatch):
    store.behaviour = "answer"
    locations.check("gs://my-bucket/a.jsonl", "config.data.forget.path")
    store.behaviour = "refuse"  # asked once per bucket and process: not again
    locations.check("gs://my-bucket/b.jsonl", "config.data.retain.path")
    with pytest.raises(locations.LocationError, match="cannot reach gs://other-bucket"):
        locations.check("gs://other-bucket/b.jsonl", "config.data.retain.path")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf"])
def test_a_bad_storage_timeout_is_refused(value, store, monkeypatch):
    monkeypatch.setenv(locations.TIMEOUT_ENV, value)
    with pytest.raises(locations.LocationError, match=rf"^JAXUNLEARN_STORAGE_TIMEOUT={value}: must be a number"):
        locations.check("gs://my-bucket/a.jsonl", "config.data.forget.path")
