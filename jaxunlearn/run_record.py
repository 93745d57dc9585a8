"""The stamp every result file carries: config, seed, mesh, dtypes, library versions, host."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

import jax

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "tokenizers", "numpy")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    import jaxunlearn

    out["jaxunlearn"] = jaxunlearn.__version__
    return out


def environment(mesh: Any = None) -> dict[str, Any]:
    from jaxunlearn.sharding import describe_mesh

    devices = jax.devices()
    env = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "versions": library_versions(),
    }
    if mesh is not None:
        env["mesh"] = describe_mesh(mesh)
    return env


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees a half-written file)."""
    path = Path(path)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # private to this writer
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
