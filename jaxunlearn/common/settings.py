"""Nested settings as flat dotted keys, and comma-separated list settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (with ``prefix="config"``: ``{"config.a.b": 1}``). Any mapping
    (a ``ConfigDict`` or a plain ``dict``) is a branch; everything else is a leaf."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def set_dotted(tree: Any, key: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``key="a.b"``."""
    *parents, leaf = key.split(".")
    for name in parents:
        tree = tree[name]
    tree[leaf] = value


def parse_list(value: str) -> list[str]:
    """The items of a comma-separated setting, stripped, empty ones dropped (``"a, b,"`` -> ``["a", "b"]``)."""
    return [item.strip() for item in value.split(",") if item.strip()]
