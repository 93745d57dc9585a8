"""Logging of a run: ``jaxunlearn: ...`` lines on stderr, and ``<workdir>/log.txt`` with everything from the start.

Lines logged before the workdir may be written to (validation, building the built-in world, data preparation)
are kept in memory and written to ``log.txt`` once the run is accepted, so a refused run leaves no file behind
while an accepted one has its whole history. Progress lines (``extra={"console": False}``) go to the file only:
on a terminal the progress bar shows them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import jax

from jaxunlearn.storage import locations

log = logging.getLogger("jaxunlearn")

_FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s")


class _Console(logging.StreamHandler):
    """stderr, without the lines that are marked for the file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True) and super().filter(record)


class _LogFile(logging.FileHandler):
    """``log.txt``; a write that fails (a full disk) closes it at once instead of printing a traceback for every
    further line: the run's own error says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802  (logging's name)
        log.removeHandler(self)
        with contextlib.suppress(Exception):  # closing flushes, which fails the same way
            self.close()


class _NotDiskFull(logging.Filter):
    """Orbax's background threads log a full disk with a traceback each; the run reports it once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (locations.disk_full(error) if error else "No space left on device" in record.getMessage())


class _Pending(logging.Handler):
    """Records kept until the run's log file exists."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def configure_logging() -> None:
    """INFO from jaxunlearn to stderr (kept in memory for ``log.txt`` until :func:`attach_log_file`); libraries
    (Orbax, absl) only warn."""
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, _Console) for h in log.handlers):
        console = _Console(sys.stderr)
        console.setFormatter(logging.Formatter("jaxunlearn: %(message)s"))
        log.addHandler(console)
    if not any(isinstance(h, _Pending) for h in log.handlers):
        log.addHandler(_Pending())
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
        if not any(isinstance(f, _NotDiskFull) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_NotDiskFull())


def console_is_terminal() -> bool:
    return sys.stderr.isatty()


def log_file(workdir: Path) -> Path:
    """This process's log file: ``log.txt`` for process 0, ``log.processN.txt`` for process N of a multi-host run
    (appending to one file from several hosts interleaves their lines)."""
    index = jax.process_index()
    return workdir / ("log.txt" if index == 0 else f"log.process{index}.txt")


def attach_log_file(workdir: Path) -> None:
    """Write everything logged so far, then every further line, to :func:`log_file`."""
    path = str(log_file(workdir))
    if any(getattr(h, "baseFilename", None) == path for h in log.handlers):
        return
    handler = _LogFile(path)
    handler.setFormatter(_FILE_FORMAT)
    for pending in [h for h in log.handlers if isinstance(h, _Pending)]:
        for record in pending.records:
            handler.handle(record)
        log.removeHandler(pending)
    log.addHandler(handler)


def detach_log_file() -> None:
    """Close the run's log file (a later run in the same process logs to its own workdir)."""
    for handler in [h for h in log.handlers if isinstance(h, (logging.FileHandler, _Pending))]:
        handler.close()
        log.removeHandler(handler)
