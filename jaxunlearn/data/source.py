"""Where one split's documents come from (:class:`DocumentSource`), the error bad data raises, and the column and
text rules every reader shares (local files, Hub datasets, TFDS)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jaxunlearn.data.python_source as python_source
from jaxunlearn.common.settings import parse_list
from jaxunlearn.storage import locations

TEXT_COLUMNS = ("text", "content")


class DataError(ValueError):
    """Input data that cannot be used; the message names the split and the culprit."""


@dataclasses.dataclass(frozen=True)
class DocumentSource:
    """Where one split's documents come from (mirrors a ``config.data.<split>`` section)."""

    label: str
    path: str
    name: str = ""
    split: str = ""
    column: str = ""
    max_documents: int = 0
    tfds_data_dir: str = ""  # only for a ``tfds:`` path; default: TFDS's own
    # Question-answer data: the question column (``column`` is then the answer's, default ``answer``); each
    # record becomes one chunk whose loss counts the answer only (:mod:`jaxunlearn.data.qa`).
    question: str = ""

    @property
    def answer_column(self) -> str:
        return self.column or "answer"

    @classmethod
    def from_config(cls, label: str, section: Mapping[str, Any]) -> DocumentSource:
        """From a ``data.<split>`` section; a field the section lacks (a config written before it existed) keeps
        its default."""
        fields = [f for f in dataclasses.fields(cls) if f.name != "label"]
        return cls(label=label, **{f.name: section[f.name] for f in fields if f.name in section})

    @property
    def is_tfds(self) -> bool:
        """``path`` names a TensorFlow Datasets selection (``tfds:NAME[/CONFIG][:VERSION]:SPLIT``)."""
        return self.path.strip().startswith("tfds:")

    @property
    def is_python(self) -> bool:
        """``path`` names Python's own text (``python:modules:...`` or ``python:topics``)."""
        return python_source.is_python_path(self.path)

    @property
    def local_paths(self) -> list[Path]:
        """The split's files or directories on this machine (a storage URL stands for its local mirror)."""
        what = f"data.{self.label}.path"
        return [Path(locations.fetch(p, what)).expanduser() for p in parse_list(self.path)]

    @property
    def is_local(self) -> bool:
        if self.is_tfds or self.is_python:
            return False
        paths = self.local_paths
        return bool(paths) and all(p.exists() for p in paths)

    @property
    def selection(self) -> str:
        """``[name:split]`` as a dataset reads them (empty: the default configuration and ``train``)."""
        return f"[{self.name or 'default'}:{self.split or 'train'}]"

    def describe(self) -> str:
        if self.is_tfds:
            return f"{self.path.strip()} (TFDS data_dir {locations.shown(tfds_data_dir(self))})"
        if self.is_python or self.is_local:
            return self.path
        return f"{self.path}{self.selection}"


def tfds_data_dir(source: DocumentSource) -> str:
    """The TFDS data_dir as given: ``tfds_data_dir``, else TFDS's default (``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets``)."""
    return source.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or str(Path("~/tensorflow_datasets").expanduser())


def pick_column(record_keys: list[str], source: DocumentSource, where: str) -> str:
    if source.column:
        if source.column not in record_keys:
            raise DataError(
                f"data.{source.label}: column {source.column!r} not found in {where} (columns: {', '.join(record_keys)})"
            )
        return source.column
    for column in TEXT_COLUMNS:
        if column in record_keys:
            return column
    raise DataError(
        f"data.{source.label}: {where} has no 'text' or 'content' column (columns: {', '.join(record_keys)}); "
        f"set data.{source.label}.column"
    )


def utf8_text(data: bytes) -> tuple[str | None, int]:
    """``(text, -1)`` for UTF-8 text, else ``(None, offset of the first bad byte)``; a NUL is valid UTF-8 but never
    text (a binary file, or UTF-16), so it counts as bad."""
    bad = [data.find(b"\0")]
    text = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.append(e.start)
    bad = [i for i in bad if i >= 0]
    return (None, min(bad)) if bad else (text, -1)
