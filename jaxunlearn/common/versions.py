"""The versions of Python, the libraries and jaxunlearn that every result file records."""

from __future__ import annotations

import importlib.metadata
import platform

from jaxunlearn import __version__

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "tokenizers", "numpy")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["jaxunlearn"] = __version__
    return out
