"""A run's directory: one run at a time (a lock), the resume check, and ``run.json``, which always says how the
run ended (``completed``, ``interrupted``, ``non_finite`` or ``failed`` with the error).

A run that is refused before it starts (bad data, a busy or foreign workdir, ...) leaves the directory as it
found it: a directory it created is removed again, and nothing in an existing one is written.

A workdir at a URL (``gs://BUCKET/run``, ``file:///abs/run``) is staged (:mod:`jaxunlearn.storage.locations`): the run
writes to a local staging directory, pulled from the URL when the run is claimed and pushed back at every
checkpoint (:meth:`Workdir.sync`) and when the run ends however it ends; checkpoints go straight to the URL. The
lock then only guards against a second run on the same host: object stores have no file locks.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import jax

from jaxunlearn.common.settings import flatten
from jaxunlearn.evaluation.registry import registered
from jaxunlearn.parallel import sharding
from jaxunlearn.run import logs
from jaxunlearn.storage import locations
from jaxunlearn.storage.files import write_json
from jaxunlearn.training.loop import NonFiniteError

LOCK = ".jaxunlearn.lock"
HOLDER = ".jaxunlearn.lock.json"  # who holds the lock (the lock file itself stays empty)
EXPORT = "hf_model"

# Settings that may change between a run and its resumption: they do not change the trained parameters.
RESUMABLE_CHANGES = (
    "config.mesh.",
    "config.model.remat",
    "config.model.attention_impl",
    "config.data.cache_dir",
    "config.checkpoint.",
    "config.train.log_every",
    "config.train.split_passes",
    "config.distributed",
    "config.evaluation.enabled",
    "config.evaluation.batch_size",
    "config.evaluation.max_chunks",
    "config.evaluation.dtype",
    "config.evaluation.metrics",
    "config.evaluation.oracle_model",
    "config.evaluation.pretraining_tokens",
    "config.data.approximate.",
    "config.data.general.",
)


class WorkdirError(RuntimeError):
    """The workdir holds a different run, is in use, or cannot receive the run's outputs."""


def resumable_changes() -> tuple[str, ...]:
    """:data:`RESUMABLE_CHANGES` and every registered metric's options (``config.evaluation.<metric>.``)."""

    return RESUMABLE_CHANGES + tuple(f"config.evaluation.{name}." for name in registered())


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ and that matter for the trained parameters (compared as JSON, as checkpoints
    store them: a tuple equals the list it was saved as)."""
    a, b = (flatten(json.loads(json.dumps(d, default=str)), "config") for d in (old, new))
    # A setting added since the run started, at an empty default ("", 0, off), is the behaviour it ran with.
    added = {k for k in set(a) ^ set(b) if not (a.get(k) or b.get(k))}
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in added)
    return [k for k in keys if not k.startswith(resumable_changes())]


class Workdir:
    """The directory of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.url = locations.remote(path, "--workdir")
        self.path = locations.staging_dir(self.url) if self.url else Path(path).expanduser().absolute()
        self.staged = locations.Staged(self.url, self.path, skip=_not_staged) if self.url else None
        if self.staged:
            self.staged.replaced = (EXPORT,)
        self.record: dict[str, Any] | None = None  # run.json, once the run is accepted
        self._lock: filelock.BaseFileLock | None = None

    @property
    def checkpoints(self) -> Any:
        """Where the checkpoints are: in the workdir, at its URL for a staged one (Orbax writes to stores)."""
        return self.url / "checkpoints" if self.url else self.path / "checkpoints"

    def location(self, *parts: str) -> str:
        """Where a file of the workdir is for the user: under the URL for a staged workdir."""
        return str((self.url if self.url else self.path).joinpath(*parts))

    def sync(self) -> None:
        """Push a staged workdir's changed files to its URL (nothing to do for a local one)."""
        if self.staged and self.record is not None:
            self.staged.push()

    @contextlib.contextmanager
    def claimed(self) -> Iterator[Workdir]:
        """Hold the workdir for the duration of the run; record how the run ended."""
        self.check_export_target()
        existed = self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._acquire()
            if self.staged:
                self.staged.pull(clear=True, keep=_pulled)
            yield self
        except BaseException as e:
            if self.record is not None:
                self.finish(_status(e), error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            elif not existed and jax.process_index() == 0:
                self._release()
                shutil.rmtree(self.path, ignore_errors=True)  # refused before it started: leave no trace
            raise
        finally:
            self._release()
            logs.detach_log_file()
            self.sync()

    def check_export_target(self) -> None:
        """The export replaces ``hf_model/`` as a whole: refuse a link there before any work, not after it."""
        target = self.path / EXPORT
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise WorkdirError(
                f"{target} is a {'symbolic link' if target.is_symlink() else 'file'}; the export replaces "
                f"{EXPORT}/ as a whole and never follows links: remove it or choose another --workdir"
            )

    def _acquire(self) -> None:
        """Take the lock (process 0; the decision is shared with every process), or refuse naming the holder."""
        error = None
        if jax.process_index() == 0:
            lock = filelock.FileLock(self._lock_dir / LOCK, timeout=0)
            try:
                lock.acquire()
                self._lock = lock
                write_json(self._lock_dir / HOLDER, _holder())
            except filelock.Timeout:
                error = f"{self.path} is in use by another jaxunlearn run ({self._holder_text()}); wait for it to end"
        error = sharding.from_process0(error)
        if error:
            raise WorkdirError(error)

    def _holder_text(self) -> str:
        try:
            h = json.loads((self._lock_dir / HOLDER).read_text())
            return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    @property
    def _lock_dir(self) -> Path:
        """The lock of a staged workdir lives next to the staging directories, which are emptied on each claim."""
        return self.path.parent if self.staged else self.path

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def accept(self, record: dict[str, Any]) -> None:
        """The run goes ahead in this workdir: start ``log.txt`` (with everything logged so far) and ``run.json``."""
        logs.attach_log_file(self.path)
        self.record = dict(record, status="running")
        self._write_record()

    def finish(self, status: str, **fields: Any) -> dict[str, Any]:
        """Record how the run ended in ``run.json``; returns the record."""
        assert self.record is not None
        self.record.update(status=status, **fields)
        self._write_record()
        return self.record

    def _write_record(self) -> None:
        if jax.process_index() == 0:
            write_json(self.path / "run.json", self.record)


def _not_staged(relative: str) -> bool:
    """Never copied between a staged workdir and its URL: checkpoints (Orbax reads and writes them at the URL)
    and the lock."""
    return relative.startswith("checkpoints/") or relative in (LOCK, HOLDER)


def _pulled(relative: str) -> bool:
    """What a resumed staged run needs locally: everything but the export's weights (its config.json tells
    whether the export is current)."""
    return not relative.startswith(f"{EXPORT}/") or relative == f"{EXPORT}/config.json"


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _status(error: BaseException) -> str:

    if isinstance(error, NonFiniteError):
        return "non_finite"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "failed"
