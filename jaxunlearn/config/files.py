"""The shipped config files (the repo's ``configs/``, installed as ``jaxunlearn.configs``), found by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def config_files() -> dict[str, Path]:
    """The shipped config files by name (``ga_kl`` -> ``.../ga_kl.py``): the package ``jaxunlearn.configs``, which
    is the repo's top-level ``configs/`` installed (editable or wheel), else that directory of an uninstalled
    checkout."""
    spec = importlib.util.find_spec("jaxunlearn.configs")
    directory = Path(spec.origin).parent if spec and spec.origin else Path(__file__).resolve().parents[2] / "configs"
    return {p.stem: p for p in sorted(directory.glob("*.py")) if not p.name.startswith("_")}
