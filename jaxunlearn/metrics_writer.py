"""Per-step metrics to ``metrics.jsonl`` and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            workdir = Path(workdir)
            self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115  (kept open for the run)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

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
