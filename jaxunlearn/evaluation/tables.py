"""Markdown helpers shared by the report and by each metric's report section."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def fmt(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; ``-`` for missing values and NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def table(
    results: Mapping[str, Mapping[str, Any]],
    label: str,
    fields: Sequence[tuple[str, str]],
    digits: int,
    skip: Sequence[str] = (),
) -> list[str]:
    """Markdown rows, one per key of the first model's result (splits, attacks, tasks), one column per
    (field, model): ``results`` maps a model name to its ``{row key: {field: value}}``."""
    names = list(results)
    header = [label] + [f"{title} {n}" for _, title in fields for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in next(iter(results.values())):
        if key.startswith("_") or key in skip:
            continue
        row = [key] + [fmt(results[n].get(key, {}).get(field), digits) for field, _ in fields for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def section(
    title: str, note: str, results: Mapping[str, Mapping[str, Any]], label: str, fields, digits: int
) -> list[str]:
    """A report section: ``## title``, an explanatory ``note`` and the :func:`table` of ``results``."""
    return [f"## {title}", "", note, "", *table(results, label, fields, digits)]
