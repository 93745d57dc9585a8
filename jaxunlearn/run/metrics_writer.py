"""Per-step metrics to ``metrics.jsonl`` and TensorBoard event files (process 0 only).

A resumed run continues both from its checkpoint's step: lines and events written after that step by the
interrupted run are dropped first, so every step appears once.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import jax

from jaxunlearn.storage.files import write_text


class MetricWriter:
    def __init__(self, workdir: str | Path, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            workdir = Path(workdir)
            path = workdir / "metrics.jsonl"
            _drop_lines_after(path, resume_step)
            self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115  (kept open for the run)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **clean}, sort_keys=True) + "\n")
        for key, value in clean.items():
            if isinstance(value, float) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        """Close both files; when one cannot be closed (a full disk), the other still is and the first error is
        raised, without tensorboardX's thread or exit hook printing tracebacks of their own."""
        error = None
        for close in (self._close_jsonl, self._close_tensorboard):
            try:
                close()
            except OSError as e:
                error = error or e
        if error is not None:
            raise error

    def _close_jsonl(self) -> None:
        jsonl, self._jsonl = self._jsonl, None
        if jsonl is not None:
            jsonl.close()

    def _close_tensorboard(self) -> None:
        tb, self._tb = self._tb, None
        if tb is None:
            return
        try:
            tb.close()
        except OSError:
            _abandon(tb)
            raise

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Discard:
    """Writes nothing: what a failed event file still had to write."""

    def write_event(self, event: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _abandon(tb: Any) -> None:
    """After a close that failed: stop each event file's thread without writing more, and mark it closed, so that
    neither the thread nor tensorboardX's exit hook tries again (each would print a traceback)."""
    for file_writer in list((getattr(tb, "all_writers", None) or {}).values()):
        events = getattr(file_writer, "event_writer", None)
        worker = getattr(events, "_worker", None)
        if events is None or events._closed:
            continue
        events._closed = True
        if worker is not None:
            worker._record_writer = _Discard()
            with contextlib.suppress(Exception):
                worker.stop()


def _drop_lines_after(path: Path, step: int) -> None:
    """Keep only the lines of steps up to ``step`` (and none that a kill cut short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
    write_text(path, "".join(f"{line}\n" for line in kept))
