"""Documents from Hugging Face datasets or local files, one ``data`` config section per split.

A split is described by ``path`` (local files or directories, comma-separated, or a Hub dataset id), ``name`` (the dataset
configuration, e.g. ``arxiv``), ``split`` (e.g. ``forget``), ``column`` (default: ``text``, else ``content``)
and ``max_documents`` (0 = all). Local files: ``.jsonl``/``.json`` (one document per record), ``.parquet``
(one per row) and ``.txt`` (one per file); a directory contributes all of those inside it, in sorted order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TEXT_COLUMNS = ("text", "content")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


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

    @classmethod
    def from_config(cls, label: str, section: Mapping[str, Any]) -> DocumentSource:
        return cls(label=label, **{f.name: section[f.name] for f in dataclasses.fields(cls) if f.name != "label"})

    @property
    def local_paths(self) -> list[Path]:
        return [Path(p.strip()).expanduser() for p in self.path.split(",") if p.strip()]

    @property
    def is_local(self) -> bool:
        paths = self.local_paths
        return bool(paths) and all(p.exists() for p in paths)

    def describe(self) -> str:
        if self.is_local:
            return self.path
        return f"{self.path}[{self.name or 'default'}:{self.split or 'train'}]"


def _pick_column(record_keys: list[str], source: DocumentSource, where: str) -> str:
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


def _records_from_json(path: Path, source: DocumentSource) -> list[str]:
    texts = []
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"data.{source.label}: {path}:{lineno} is not valid JSON: {e}") from e
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"data.{source.label}: {path} is not valid JSON: {e}") from e
        rows = data if isinstance(data, list) else [data]
    for i, row in enumerate(rows):
        if isinstance(row, str):
            texts.append(row)
            continue
        if not isinstance(row, dict):
            raise DataError(f"data.{source.label}: record {i} of {path} is neither an object nor a string")
        column = _pick_column(sorted(row), source, f"{path} record {i}")
        texts.append(str(row[column]))
    return texts


def _records_from_parquet(path: Path, source: DocumentSource) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    column = _pick_column(names, source, str(path))
    return [str(x) for x in pq.read_table(path, columns=[column]).column(column).to_pylist()]


def _local_files(source: DocumentSource) -> list[Path]:
    files = []
    for root in source.local_paths:
        if root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        elif root.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"data.{source.label}: {root} is not one of {', '.join(LOCAL_SUFFIXES)}")
        else:
            files.append(root)
    return files


def _local_documents(source: DocumentSource) -> list[str]:
    files = _local_files(source)
    docs: list[str] = []
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            docs.extend(_records_from_json(f, source))
        elif f.suffix == ".parquet":
            docs.extend(_records_from_parquet(f, source))
        else:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    return docs


def _hub_documents(source: DocumentSource) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(source.path, source.name or None, split=source.split or "train")
    except ValueError as e:  # unknown split / config
        raise DataError(f"data.{source.label}: cannot load {source.describe()}: {e}") from e
    except Exception as e:  # offline, unknown dataset, network
        raise DataError(
            f"data.{source.label}: {source.path!r} is not a local path and could not be loaded from the Hugging "
            f"Face Hub ({type(e).__name__}: {e}). Offline machines need a local copy (jsonl/json/parquet/txt) "
            "or a populated HF_DATASETS cache."
        ) from e
    column = _pick_column(list(ds.column_names), source, source.describe())
    return [str(x) for x in ds[column]]


def load_documents(source: DocumentSource) -> list[str]:
    """All documents of one split, in a stable order, truncated to ``max_documents`` when set."""
    if not source.path:
        raise DataError(f"data.{source.label}.path is empty: give a local file/directory or a Hub dataset id")
    docs = _local_documents(source) if source.is_local else _hub_documents(source)
    if source.max_documents:
        docs = docs[: source.max_documents]
    return docs


def documents_fingerprint(docs: list[str]) -> str:
    """A content hash of an ordered list of documents."""
    h = hashlib.sha256()
    for d in docs:
        data = d.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
