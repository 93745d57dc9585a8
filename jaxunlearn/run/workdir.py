"""A run's directory: one run at a time (a lock), the resume check, and ``run.json``, which always says how the
run ended (``completed``, ``interrupted``, ``non_finite`` or ``failed`` with the error).

A run that is refused before it starts (bad data, a busy or foreign workdir, ...) leaves the directory as it
found it: a directory it created is removed again, and nothing in an existing one is written.

A workdir at a URL (``gs://BUCKET/run``, ``file:///abs/run``) is staged (:mod:`jaxunlearn.storage.locations`): the run
writes to a local staging directory, pulled from the URL when the run is claimed and pushed back at every
checkpoint (:meth:`Workdir.sync`) and when the run ends however it ends; checkpoints go straight to the URL.

The lock is keyed on the resolved place: a local workdir (or a ``file://`` one) is locked in the directory itself,
found through symbolic links and ``..``, so ``/runs/x``, ``/runs/x/``, ``/runs/../runs/x``, a link to it and
``file:///runs/x`` are one lock. A workdir in an object store is locked next to its staging directories, which only
guards against a second run on the same host: object stores have no file locks.

A workdir that holds files jaxunlearn did not write (an existing directory, not empty, without a jaxunlearn
``run.json``) is refused unless the run is told to share it (``--force_workdir``); even then, none of the user's
files is ever replaced: one whose name the run writes (:data:`OUTPUTS`) is refused, flag or not.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import jax

from jaxunlearn.common import interrupts
from jaxunlearn.common.settings import flatten
from jaxunlearn.evaluation.registry import registered
from jaxunlearn.parallel import sharding
from jaxunlearn.run import logs
from jaxunlearn.storage import locations
from jaxunlearn.storage.files import write_json
from jaxunlearn.training.loop import NonFiniteError

log = logging.getLogger("jaxunlearn")

LOCK = ".jaxunlearn.lock"
HOLDER = ".jaxunlearn.lock.json"  # who holds the lock (the lock file itself stays empty)
EXPORT = "hf_model"
ADAPTER_EXPORT = "hf_adapter"  # with LoRA: the adapters alone, in PEFT's format
# The top-level names a run writes in its workdir (besides ``log.processN.txt``): never a user's file of these names.
OUTPUTS = (
    "run.json",
    "log.txt",
    "metrics.jsonl",
    "tensorboard",
    "checkpoints",
    "eval",
    EXPORT,
    ADAPTER_EXPORT,
    "report.json",
    "report.md",
    "perplexity_history.png",
    "roc.png",
)
FORCE_FLAG = "--force_workdir"

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
    # LoRA's settings do nothing while its rank is 0 (off) in both.
    if not (a.get("config.lora.rank") or b.get("config.lora.rank")):
        added |= {k for k in set(a) | set(b) if k.startswith("config.lora.")}
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in added)
    return [k for k in keys if not k.startswith(resumable_changes())]


class Workdir:
    """The directory of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False):
        self.given = os.fspath(path)
        self.force = force  # share a directory that holds other files (never replacing one of them)
        self.url = locations.remote(path, "--workdir")
        self.path = locations.staging_dir(self.url) if self.url else Path(path).expanduser().absolute()
        self.staged = locations.Staged(self.url, self.path, skip=_not_staged) if self.url else None
        if self.staged:
            self.staged.replaced = (EXPORT, ADAPTER_EXPORT)
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
        if self.url is not None and self._local is None:
            locations.check_reachable(self.url, self.given, "--workdir")  # in bounded time, before anything is made
        self.check_place()
        self.check_export_target()
        self.check_foreign_files()
        existed = self.path.exists()
        lock_dir_existed = self._lock_dir.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"--workdir={self.given}: cannot create it ({e.strerror or e})") from None
        try:
            self._acquire()
            if self.staged:
                self.staged.pull(clear=True, keep=_pulled)
            yield self
        except BaseException as e:
            with interrupts.deferred(deliver=False):
                if self.record is not None:
                    self.finish(_status(e), error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                elif jax.process_index() == 0:
                    self._release()
                    if not existed:
                        shutil.rmtree(self.path, ignore_errors=True)  # refused before it started: leave no trace
                    if not lock_dir_existed:
                        shutil.rmtree(self._lock_dir, ignore_errors=True)
            raise
        finally:
            with interrupts.deferred(deliver=False):
                self._release()
                logs.detach_log_file()
                self.sync()

    @property
    def _local(self) -> Path | None:
        """The workdir's own directory when it is on this machine's filesystem (a path or a ``file://`` URL),
        resolved: symbolic links and ``..`` followed, so every spelling of one place gives one directory."""
        if self.url is None:
            return Path(os.path.realpath(self.path))
        if not locations.is_url(os.fspath(self.url)):
            return Path(os.path.realpath(os.fspath(self.url)))
        return None

    def check_place(self) -> None:
        """A workdir that cannot be a directory (an existing file, a path under a file) is refused in one line,
        before anything is created."""
        for place in {self.path, self._local} - {None}:
            try:
                is_file = place.exists() and not place.is_dir()
                parent = next((p for p in place.parents if p.exists()), None)
            except OSError as e:  # a name too long, a loop of links, ...
                raise WorkdirError(f"--workdir={self.given}: cannot use it ({e.strerror or e})") from None
            if is_file:
                raise WorkdirError(
                    f"--workdir={self.given}: {place} is a file, not a directory; choose another --workdir"
                )
            if parent is not None and not parent.is_dir():
                raise WorkdirError(
                    f"--workdir={self.given}: {parent} is a file, so no directory can be made under it; choose "
                    "another --workdir"
                )

    def check_foreign_files(self) -> None:
        """Refuse a directory that holds files no jaxunlearn run wrote (unless :attr:`force`), and with
        :attr:`force` any of them whose name the run writes: nothing of the user's is ever replaced."""
        if jax.process_index() != 0:
            return
        where = self._local if self._local is not None else self.url
        try:
            foreign = foreign_files(where)
        except OSError as e:  # an unreadable directory
            raise WorkdirError(f"--workdir={self.given}: cannot read it ({e.strerror or e})") from None
        if not foreign:
            return
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        clashing = [name for name in foreign if _is_output(name)]
        if clashing:
            raise WorkdirError(
                f"--workdir={self.given} holds files jaxunlearn did not write ({shown}) and no jaxunlearn run.json; "
                f"a run would replace {', '.join(clashing)}: choose another --workdir (or an empty or new directory)"
            )
        if not self.force:
            raise WorkdirError(
                f"--workdir={self.given} holds files jaxunlearn did not write ({shown}) and no jaxunlearn run.json: "
                f"choose an empty or new directory, or pass {FORCE_FLAG} to run among them (none is replaced)"
            )
        log.info("%s holds other files (%s); %s: running among them", self.given, shown, FORCE_FLAG)

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
                error = (
                    f"{self.location()} is in use by another jaxunlearn run ({self._holder_text()}); wait for it to end"
                )
        error = sharding.from_process0(error)
        if error:
            raise WorkdirError(error)

    def _holder_text(self) -> str:
        try:
            h = json.loads((self._lock_dir / HOLDER).read_text())
            return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return "holder unknown"

    @property
    def _lock_dir(self) -> Path:
        """The workdir's own directory, resolved (:attr:`_local`); for a workdir in an object store, next to its
        staging directories, which are emptied on each claim."""
        local = self._local
        return local if local is not None else self.path.parent

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
            path = self.path / "run.json"
            try:
                write_json(path, self.record)
            except OSError as e:
                if e.errno != errno.ENOSPC or not path.exists():
                    raise
                # A full disk: rewrite the record in place, in the blocks the old one holds (not atomic, but the
                # only way run.json can say how the run ended).
                with open(path, "r+") as f:
                    f.write(json.dumps(self.record, indent=2, sort_keys=True, default=str))
                    f.truncate()


def foreign_files(directory: Path | Any | None) -> list[str]:
    """The top-level entries of an existing workdir that no jaxunlearn run wrote: none for a new or empty
    directory or one holding a jaxunlearn ``run.json``; the lock's files and an empty (or Orbax-only)
    ``checkpoints/`` (left by a run killed before it wrote ``run.json``) do not count."""
    if directory is None:
        return []
    try:
        names = sorted(p.name for p in directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = [n for n in names if n not in (LOCK, HOLDER) and not (n == "checkpoints" and _orbax_only(directory / n))]
    if not names or _is_run_record(directory / "run.json"):
        return []
    return names


def _is_run_record(path: Any) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and {"config", "method", "status"} <= set(record)


def _orbax_only(directory: Any) -> bool:
    try:
        return all(p.name.isdigit() or "orbax-checkpoint-tmp" in p.name for p in directory.iterdir())
    except OSError:
        return False


def _is_output(name: str) -> bool:
    return name in OUTPUTS or (name.startswith("log.process") and name.endswith(".txt"))


def _not_staged(relative: str) -> bool:
    """Never copied between a staged workdir and its URL: checkpoints (Orbax reads and writes them at the URL)
    and the lock."""
    return relative.startswith("checkpoints/") or relative in (LOCK, HOLDER)


def _pulled(relative: str) -> bool:
    """What a resumed staged run needs locally: everything but the export's weights (its config.json tells
    whether the export is current)."""
    if relative.startswith(f"{ADAPTER_EXPORT}/"):
        return False
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
