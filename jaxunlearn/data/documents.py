"""Documents from Hugging Face datasets or local files, one ``data`` config section per split.

A split is described by ``path`` (local files or directories, comma-separated, or a Hub dataset id), ``name`` (the dataset
configuration, e.g. ``arxiv``), ``split`` (e.g. ``forget``), ``column`` (default: ``text``, else ``content``)
and ``max_documents`` (0 = all). Local files: ``.jsonl``/``.json`` (one document per record), ``.parquet``
(one per row) and ``.txt`` (one per file), all UTF-8; a directory contributes all of those inside it, in sorted
order. A directory laid out as a Hugging Face dataset (a ``README.md`` whose front matter lists ``configs``), or
any directory given with a ``name`` or ``split``, is read by ``datasets.load_dataset(dir, name, split=split)``
like the Hub id: only that split's files. A single local file ignores ``name`` and ``split``.

``path = "tfds:NAME[/CONFIG][:VERSION]:SPLIT"`` reads a TensorFlow Datasets data set prepared in
``tfds_data_dir`` (default ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``), without TensorFlow and never
downloading; the path carries the configuration and split, so ``name`` and ``split`` are ignored there too (see
:mod:`jaxunlearn.data.tfds_source`).

``path = "python:modules:NAME[,NAME...]"`` reads the source files of installed Python modules (the standard
library, or any package) and ``python:topics`` the language reference shipped with Python
(:mod:`jaxunlearn.data.python_source`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jaxunlearn.data.python_source as python_source
import jaxunlearn.data.tfds_source as tfds_source
from jaxunlearn.data.source import DataError, DocumentSource, pick_column, utf8_text

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
# Files of a Hugging Face dataset directory that are checked for UTF-8 text before datasets reads them.
TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv")


# What a read keeps of each record: ``None`` = the split's text column (``column``, else text/content) as a string;
# a tuple of column names = those columns' values, as a dict per record (question-answer data).
Columns = tuple[str, ...] | None


def _columns(record_keys: list[str], source: DocumentSource, where: str, columns: Columns) -> list[str]:
    """The columns to keep from records with ``record_keys``; DataError naming a missing one."""
    if columns is None:
        return [pick_column(record_keys, source, where)]
    missing = [c for c in columns if c not in record_keys]
    if missing:
        raise DataError(
            f"data.{source.label}: {where} has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(record_keys)})"
        )
    return list(columns)


def _value(row: Mapping[str, Any], keep: list[str], columns: Columns) -> Any:
    return str(row[keep[0]]) if columns is None else {c: row[c] for c in keep}


def _read_text(path: Path, source: DocumentSource) -> str:
    """The file as ``Path.read_text`` gives it (universal newlines), refusing bytes that are not UTF-8 text."""
    data = path.read_bytes()
    text, at = utf8_text(data)
    if text is None:
        line = data.count(b"\n", 0, at) + 1
        raise DataError(
            f"data.{source.label}: {path} is not UTF-8 text: byte 0x{data[at]:02x} at byte offset {at} "
            f"(line {line}); re-encode the file as UTF-8"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _records_from_json(path: Path, source: DocumentSource, columns: Columns) -> list[Any]:
    texts = []
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(_read_text(path, source).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
                    raise DataError(f"data.{source.label}: {path}:{lineno} is not valid JSON: {e}") from e
    else:
        try:
            data = json.loads(_read_text(path, source))
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
            raise DataError(f"data.{source.label}: {path} is not valid JSON: {e}") from e
        rows = data if isinstance(data, list) else [data]
    for i, row in enumerate(rows):
        if isinstance(row, str) and columns is None:
            texts.append(row)
            continue
        if not isinstance(row, dict):
            what = "not an object" if columns else "neither an object nor a string"
            raise DataError(f"data.{source.label}: record {i} of {path} is {what}")
        texts.append(_value(row, _columns(sorted(row), source, f"{path} record {i}", columns), columns))
    return texts


@contextlib.contextmanager
def _parquet_errors(path: Path, source: DocumentSource) -> Iterator[None]:
    """pyarrow's errors for a damaged file (ArrowInvalid: truncated or not Parquet; OSError: bad pages) as DataError."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data.{source.label}: {path} is not a readable Parquet file ({type(e).__name__}: {e})") from e


def _parquet_columns(path: Path, source: DocumentSource) -> list[str]:
    import pyarrow.parquet as pq

    with _parquet_errors(path, source):
        return pq.read_schema(path).names


def _parquet_table(path: Path, source: DocumentSource, columns: list[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    with _parquet_errors(path, source):
        return pq.read_table(path, columns=columns)


def _records_from_parquet(path: Path, source: DocumentSource, columns: Columns) -> list[Any]:
    keep = _columns(_parquet_columns(path, source), source, str(path), columns)
    table = _parquet_table(path, source, keep)
    if columns is None:
        return [str(x) for x in table.column(keep[0]).to_pylist()]
    return table.to_pylist()


def _has_dataset_configs(root: Path) -> bool:
    """Whether ``root`` is a Hugging Face dataset directory: its ``README.md`` front matter lists ``configs``."""
    readme = root / "README.md"
    if not readme.is_file():
        return False
    import yaml
    from huggingface_hub import DatasetCard

    try:
        return bool(DatasetCard.load(readme).data.get("configs"))
    except (ValueError, yaml.YAMLError):  # a README that is not a dataset card: a plain directory
        return False


def _local_files(root: Path, source: DocumentSource) -> list[Path]:
    if root.is_dir():
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if root.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"data.{source.label}: {root} is not one of {', '.join(LOCAL_SUFFIXES)}")
    return [root]


def _file_documents(path: Path, source: DocumentSource, columns: Columns) -> list[Any]:
    if path.suffix in (".jsonl", ".json"):
        return _records_from_json(path, source, columns)
    if path.suffix == ".parquet":
        return _records_from_parquet(path, source, columns)
    if columns is not None:
        raise DataError(f"data.{source.label}: {path} is plain text; records with columns need jsonl/json/parquet")
    return [_read_text(path, source)]


def _local_documents(source: DocumentSource, columns: Columns) -> list[Any]:
    roots = source.local_paths
    datasets_dirs = {r for r in roots if r.is_dir() and (source.name or source.split or _has_dataset_configs(r))}
    files = {r: _local_files(r, source) for r in roots if r not in datasets_dirs}  # bad suffixes fail first
    docs: list[Any] = []
    for root in roots:
        if root in datasets_dirs:
            docs.extend(_dataset_documents(source, str(root), columns))
        else:
            for f in files[root]:
                docs.extend(_file_documents(f, source, columns))
    return docs


def _unreachable(source: DocumentSource, path: str, e: Exception) -> DataError:
    if Path(path).exists():
        return DataError(f"data.{source.label}: cannot read the dataset in {path} ({type(e).__name__}: {e})")
    return DataError(
        f"data.{source.label}: {path!r} is not a local path and could not be loaded from the Hugging "
        f"Face Hub ({type(e).__name__}: {e}). Offline machines need a local copy (jsonl/json/parquet/txt, or "
        "a directory laid out like the Hub dataset) or a populated HF_DATASETS cache."
    )


def _available(path: str, configs: list[str]) -> str:
    """``config (split, split), ...`` for an error message."""
    import datasets

    parts = []
    for config in configs:
        try:
            splits = [str(s) for s in datasets.load_dataset_builder(path, config).config.data_files or {}]
        except Exception:  # listing is best effort: the message still names the configuration
            splits = []
        parts.append(f"{config} ({', '.join(splits) or '?'})")
    return ", ".join(parts)


def _selection_error(source: DocumentSource, path: str, problem: str, configs: list[str]) -> DataError:
    message = f"data.{source.label}: {path} {problem}; it has: {_available(path, configs)}"
    if configs == ["default"] and Path(path).is_dir():
        message += f" (a plain directory is read whole when data.{source.label}.name and .split are both empty)"
    return DataError(message)


def _dataset_builder(source: DocumentSource, path: str) -> Any:
    """The ``datasets`` builder of the configuration ``source.name`` selects; DataError when it selects none."""
    import datasets

    try:
        configs = list(datasets.get_dataset_config_names(path))
    except Exception as e:  # offline, unknown dataset, unreadable card: datasets raises many types
        raise _unreachable(source, path, e) from e
    if source.name and source.name not in configs:
        raise _selection_error(source, path, f"has no configuration {source.name!r}", configs)
    if not source.name and len(configs) > 1:
        raise _selection_error(source, path, f"has several configurations: set data.{source.label}.name", configs)
    try:
        return datasets.load_dataset_builder(path, source.name or None)
    except Exception as e:
        raise _unreachable(source, path, e) from e


def _split_files(source: DocumentSource, path: str, builder: Any) -> list[Path]:
    """The local data files of the selected split, each checked to be readable; DataError for an unknown split."""
    data_files = builder.config.data_files
    if data_files is None:  # a prepared dataset from the cache: load_dataset checks the split
        return []
    split = source.split or "train"
    if split not in data_files:
        problem = f"configuration {builder.config.name!r} has no split {split!r}"
        raise _selection_error(source, path, problem, [builder.config.name])
    files = [Path(f) for f in data_files[split] if Path(f).is_file()]  # Hub files are hf:// URLs
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            _read_text(f, source)
        elif f.suffix == ".parquet":
            _parquet_columns(f, source)
    return files


def _dataset_documents(source: DocumentSource, path: str, columns: Columns) -> list[Any]:
    """One split of a Hugging Face dataset: a Hub id or a local directory laid out like one."""
    import datasets

    files = _split_files(source, path, _dataset_builder(source, path))
    where = f"{path}{source.selection}"
    try:
        ds = datasets.load_dataset(path, source.name or None, split=source.split or "train")
    except Exception as e:  # datasets and pyarrow raise many types for unreadable data
        for f in files:  # name the culprit when it is a local Parquet file with damaged pages
            if f.suffix == ".parquet":
                _parquet_table(f, source)
        raise DataError(f"data.{source.label}: cannot read {where} ({type(e).__name__}: {e})") from e
    keep = _columns(list(ds.column_names), source, where, columns)
    if columns is None:
        return [str(x) for x in ds[keep[0]]]
    return list(ds.select_columns(keep))


def _python_documents(source: DocumentSource, columns: Columns) -> list[str]:
    if columns is not None:
        raise DataError(f"data.{source.label}: {source.path} is Python's own text, which gives text documents only")
    try:
        return python_source.documents(source.path)
    except (ValueError, OSError) as e:  # an unknown module, a bad form, an unreadable file
        raise DataError(f"data.{source.label}.path={source.path!r}: {e}") from e


def _load(source: DocumentSource, columns: Columns) -> list[Any]:
    if not source.path:
        raise DataError(
            f"data.{source.label}.path is empty: give a local file/directory, a Hub dataset id, a tfds: selection or "
            "python:modules:NAME,..."
        )
    if source.is_tfds:
        if columns is not None:
            raise DataError(f"data.{source.label}: {source.path} is a tfds: selection, which gives text documents only")
        docs = tfds_source.documents(source)
    elif source.is_python:
        docs = _python_documents(source, columns)
    else:
        docs = (
            _local_documents(source, columns) if source.is_local else _dataset_documents(source, source.path, columns)
        )
    if source.max_documents:
        docs = docs[: source.max_documents]
    return docs


def load_documents(source: DocumentSource) -> list[str]:
    """All documents of one split, in a stable order, truncated to ``max_documents`` when set."""
    return _load(source, None)


def load_records(source: DocumentSource, columns: Sequence[str]) -> list[dict[str, Any]]:
    """All records of one split with the values of ``columns`` (strings, or lists for list columns such as TOFU's
    ``perturbed_answer``), in a stable order, truncated to ``max_documents``; jsonl/json/parquet files or a
    Hugging Face dataset. DataError naming a missing column."""
    return _load(source, tuple(columns))


def documents_fingerprint(docs: list[str]) -> str:
    """A content hash of an ordered list of documents."""
    h = hashlib.sha256()
    for d in docs:
        data = d.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
