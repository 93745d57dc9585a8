"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically (a reader never sees a half-written file); on failure (a full disk, a directory in
    the way) the error propagates and no temporary file is left behind."""
    path = Path(path)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # private to this writer
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees a half-written file)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


# --- what a run records -------------------------------------------------------------------------------------
