"""Per-step metrics to ``metrics.jsonl`` and TensorBoard event files (process 0 only).

A resumed run continues both from its checkpoint's step: lines and events written after that step by the
interrupted run are dropped first, so every step appears once.
"""

from __future__ import annotations

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
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _drop_lines_after(path: Path, step: int) -> None:
    """Keep only the lines of steps up to ``step`` (and none that a kill cut short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(f"{line}\n" for line in kept))
