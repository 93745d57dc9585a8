"""Documents from TensorFlow Datasets prepared on disk: ``data.<split>.path = "tfds:NAME[/CONFIG][:VERSION]:SPLIT"``.

``SPLIT`` is any TFDS split expression (``train``, ``train[:100]``, ``train[10%:]``, ``test+validation``). The data
are read from ``data.<split>.tfds_data_dir`` (default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``, as TFDS
itself), as ``tfds build NAME --data_dir=DIR`` leaves them: ``DIR/NAME[/CONFIG]/VERSION/`` with
``dataset_info.json``, ``features.json`` and the record shards. Nothing is ever downloaded or prepared here: a
dataset that is not in the data_dir is refused with the command that prepares it.

No TensorFlow is needed. TFDS's own metadata code (a read-only builder from the directory) gives the features, the
splits and, for a split expression, the shards with the records to skip and take; TFDS's NumPy example parser
decodes each record. The records of the three file formats TFDS writes are read directly: ``array_record`` with
the ``array_record`` package, ``parquet`` with pyarrow, and ``tfrecord`` (TFDS's default) with the small framing
reader below (each record's length checksum is verified; its data checksum is not: that would cost a pure-Python
CRC32C pass over every byte). Documents come in the order TFDS stored them, which for a shuffled dataset is a fixed
order by a hash of each example's key, the same on every machine.

A data_dir at a storage URL (``gs://...``): the small metadata files are read through etils (TFDS's own path
layer), and each record shard a selection touches is copied once into the local mirror of
:mod:`jaxunlearn.storage.locations` (ArrayRecord's reader opens local files only; a mirror also serves every later run
and every process of the host, and a selection of a few books copies one shard, not the data set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxunlearn.data.source import DataError, DocumentSource, pick_column, tfds_data_dir, utf8_text
from jaxunlearn.storage import locations

PREFIX = "tfds:"
SYNTAX = "tfds:NAME[/CONFIG][:VERSION]:SPLIT, e.g. tfds:pg19:train or tfds:pg19:train[:100]"
_SPEC = re.compile(
    r"^tfds:(?P<name>[a-z][a-z0-9_]*)(?:/(?P<config>[A-Za-z0-9_.+-]+))?(?::(?P<version>\d+\.\d+\.\d+))?"
    r":(?P<split>.+)$"
)
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_READABLE = ("array_record", "parquet", "tfrecord")


def is_tfds_path(path: str) -> bool:
    return path.strip().startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """A parsed ``tfds:`` path."""

    name: str
    config: str
    version: str
    split: str


def parse(path: str) -> TfdsSpec:
    """The parts of a ``tfds:`` path; ``ValueError`` saying what is wrong (no I/O, only TFDS's split parser)."""
    text = path.strip()
    if "," in text:
        raise ValueError("a tfds: path names one dataset; join splits with '+' (e.g. tfds:pg19:test+validation)")
    match = _SPEC.match(text)
    if not match:
        raise ValueError(f"not a TFDS selection: write {SYNTAX} (NAME in lower_snake_case)")
    split = match.group("split").strip()
    from tensorflow_datasets.core import splits

    try:
        splits.ReadInstruction.from_spec(split)
    except (ValueError, NotImplementedError) as e:
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(
            f"{split!r} is not a TFDS split expression ({reason}); e.g. train, train[:100], train[10%:], test+validation"
        ) from None
    return TfdsSpec(match.group("name"), match.group("config") or "", match.group("version") or "", split)


# --- finding the prepared dataset ---------------------------------------------------------------------------


class _Where:
    """The data_dir of one source, local or at a URL, and the words its errors use."""

    def __init__(self, source: DocumentSource):
        self.source = source
        self.text = tfds_data_dir(source)
        self.setting = f"data.{source.label}.tfds_data_dir"
        try:
            url = locations.remote(self.text, self.setting)
        except locations.LocationError as e:
            raise DataError(str(e)) from None
        from etils import epath

        self.root = url if url is not None else epath.Path(Path(self.text).expanduser())
        self.shown = locations.shown(self.text)

    def error(self, problem: str) -> DataError:
        return DataError(f"data.{self.source.label}: {self.source.path.strip()}: {problem}")

    def prepare_hint(self, spec: TfdsSpec) -> str:
        full = f"{spec.name}/{spec.config}" if spec.config else spec.name
        return (
            "nothing is downloaded at run time: prepare it on a machine with network access and TensorFlow (pip "
            f"install tensorflow tensorflow-datasets; tfds build {full} --data_dir=DIR), then copy DIR/{spec.name} into "
            f"{self.shown} or point {self.setting} (default $TFDS_DATA_DIR, else ~/tensorflow_datasets) at DIR"
        )


def _names(directory: Any, keep: Any = lambda p: True) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".") and keep(p))


def _versions(directory: Any) -> list[str]:
    """The complete versions prepared in a config directory, oldest first (``incomplete.*`` ones are skipped)."""
    if not directory.is_dir():
        return []
    found = _names(directory, lambda p: bool(_VERSION.match(p.name)) and (p / "dataset_info.json").exists())
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def _config_dir(where: _Where, spec: TfdsSpec, dataset: Any) -> Any:
    """``NAME/CONFIG`` (or ``NAME`` for a dataset without configurations)."""
    if spec.config:
        if not (dataset / spec.config).is_dir():
            configs = _names(dataset, lambda p: bool(_versions(p)))
            raise where.error(
                f"dataset {spec.name!r} in {where.shown} has no config {spec.config!r} prepared "
                f"(configs there: {', '.join(configs) or 'none'}); {where.prepare_hint(spec)}"
            )
        return dataset / spec.config
    if _versions(dataset):
        return dataset
    configs = _names(dataset, lambda p: bool(_versions(p)))
    from tensorflow_datasets.core import dataset_builder

    default = dataset_builder.load_default_config_name(dataset)
    if default in configs:
        return dataset / default
    if len(configs) == 1:
        return dataset / configs[0]
    if not configs:
        raise where.error(
            f"{where.shown}/{spec.name} holds no complete prepared version (an interrupted preparation leaves "
            f"incomplete.* directories); {where.prepare_hint(spec)}"
        )
    raise where.error(
        f"dataset {spec.name!r} in {where.shown} has several configs: write tfds:{spec.name}/CONFIG:{spec.split} "
        f"(configs there: {', '.join(configs)})"
    )


def _builder(where: _Where, spec: TfdsSpec) -> Any:
    """TFDS's read-only builder of the selected dataset/config/version (metadata only, no generation code)."""
    if not where.root.is_dir():
        raise where.error(
            f"the TFDS data_dir {where.shown} does not exist ({where.setting}); {where.prepare_hint(spec)}"
        )
    dataset = where.root / spec.name
    if not dataset.is_dir():
        present = [n for n in _names(where.root) if n != "downloads"]
        raise where.error(
            f"no dataset {spec.name!r} is prepared in the TFDS data_dir {where.shown} "
            f"(prepared there: {', '.join(present) or 'nothing'}); {where.prepare_hint(spec)}"
        )
    config_dir = _config_dir(where, spec, dataset)
    versions = _versions(config_dir)
    full = config_dir.relative_to(where.root).as_posix()
    if not versions:
        raise where.error(
            f"{where.shown}/{full} holds no complete prepared version (an interrupted preparation leaves "
            f"incomplete.* directories); {where.prepare_hint(spec)}"
        )
    if spec.version and spec.version not in versions:
        raise where.error(f"{where.shown}/{full} has no version {spec.version} (versions there: {', '.join(versions)})")
    version_dir = config_dir / (spec.version or versions[-1])
    from tensorflow_datasets.core import read_only_builder

    try:
        return read_only_builder.builder_from_directory(version_dir)
    except Exception as e:  # a damaged dataset_info.json / features.json, an old layout: TFDS raises many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise where.error(f"cannot read the TFDS metadata in {version_dir} ({type(e).__name__}: {reason})") from e


def _is_text(feature: Any) -> bool:
    from tensorflow_datasets.core import features
    from tensorflow_datasets.core.utils import dtype_utils

    if isinstance(feature, features.Text):
        return True
    return (
        isinstance(feature, features.Tensor) and tuple(feature.shape) == () and dtype_utils.is_string(feature.np_dtype)
    )


def _column(where: _Where, info: Any) -> str:
    """The text feature: ``column``, else ``text``/``content``; refused when it is not a string."""
    names = sorted(info.features.keys())
    column = pick_column(names, where.source, f"{where.source.path.strip()} (features of {info.full_name})")
    feature = info.features[column]
    if not _is_text(feature):
        texts = [n for n in names if _is_text(info.features[n])]
        raise where.error(
            f"feature {column!r} of {info.full_name} is not text ({type(feature).__name__}, shape "
            f"{tuple(feature.shape)}, {feature.np_dtype}); set data.{where.source.label}.column to a text feature "
            f"(text features: {', '.join(texts) or 'none'})"
        )
    return column


def _file_instructions(where: _Where, spec: TfdsSpec, info: Any) -> list[Any]:
    known = list(info.splits.keys())
    for part in spec.split.split("+"):
        name = re.match(r"\s*([^\[\s]*)", part).group(1)
        if name != "all" and name not in known:
            raise where.error(f"{info.full_name} has no split {name!r} (splits: {', '.join(known)})")
    try:
        return list(info.splits[spec.split].file_instructions)
    except (KeyError, ValueError) as e:  # a slice past the end, ...
        raise where.error(f"split {spec.split!r} of {info.full_name}: {str(e).strip().splitlines()[0]}") from e


# --- reading records ----------------------------------------------------------------------------------------


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use; for the 8-byte length headers."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _tfrecord_records(where: _Where, path: str, skip: int, take: int) -> Iterator[bytes]:
    """Records ``skip .. skip+take`` of a TFRecord file: ``uint64 length, uint32 masked CRC32C of the length,
    data, uint32 masked CRC32C of the data`` (little-endian), record after record."""
    with open(path, "rb") as f:
        for index in range(skip + take):
            offset = f.tell()
            header = f.read(12)
            if len(header) < 12:
                raise where.error(f"{path} is truncated: it ends at byte {offset}, before record {index}")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise where.error(
                    f"{path} is not a TFRecord file or is damaged: bad length checksum of record {index} at byte "
                    f"offset {offset}"
                )
            if index < skip:
                f.seek(length + 4, os.SEEK_CUR)
                continue
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise where.error(f"{path} is truncated: record {index} at byte offset {offset} is cut off")
            yield data


def _array_record_records(where: _Where, path: str, skip: int, take: int, expected: int) -> list[bytes]:
    try:
        from array_record.python import array_record_module
    except ImportError as e:  # TFDS installs it on Linux only
        raise where.error(
            f"reading its array_record shards needs the array_record package ({e}): pip install array_record "
            "(Linux), or prepare the dataset with --file_format=parquet"
        ) from e
    reader = array_record_module.ArrayRecordReader(path)  # a damaged file gives a reader that is not ok()
    try:
        found = reader.num_records() if reader.ok() else "no readable"
        if found != expected:
            raise where.error(
                f"{path} is not a readable ArrayRecord shard ({found} records, dataset_info.json says {expected})"
            )
        return list(reader.read(skip, skip + take)) if take else []
    except RuntimeError as e:  # damaged records past the index
        raise where.error(f"{path} is not a readable ArrayRecord shard ({e})") from e
    finally:
        with contextlib.suppress(RuntimeError):  # closing a reader that is not ok() raises its error again
            reader.close()


def _parquet_records(where: _Where, path: str, skip: int, take: int, expected: int) -> list[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise where.error(f"{path} is not a readable Parquet shard ({type(e).__name__}: {e})") from e
    if table.num_rows != expected or table.num_columns != 1:
        raise where.error(
            f"{path} is not a TFDS Parquet shard ({table.num_rows} rows x {table.num_columns} columns, "
            f"dataset_info.json says {expected} records in one column)"
        )
    return [v.as_py() for v in table.column(0).slice(skip, take)]


def _records(where: _Where, file_format: str, path: str, instruction: Any) -> Iterator[bytes]:
    skip, take, expected = instruction.skip, instruction.take, instruction.examples_in_shard
    if file_format == "tfrecord":
        yield from _tfrecord_records(where, path, skip, take)
    elif file_format == "array_record":
        yield from _array_record_records(where, path, skip, take, expected)
    else:
        yield from _parquet_records(where, path, skip, take, expected)


def _local_shard(where: _Where, filename: str) -> str:
    """The shard itself for a local data_dir; its local mirror for one at a URL."""
    if not locations.is_url(where.text):
        if not Path(filename).is_file():
            raise where.error(f"shard {filename} listed in dataset_info.json is missing")
        return filename
    relative = os.fspath(filename)[len(os.fspath(where.root)) :].lstrip("/")
    try:
        return locations.fetch(locations.join(where.text, relative), where.setting)
    except locations.LocationError as e:
        raise where.error(f"shard {relative} listed in dataset_info.json: {e}") from e


def _text(where: _Where, value: Any, column: str, shard: str, index: int) -> str:
    if isinstance(value, str):
        return value
    data = bytes(value)
    text, bad = utf8_text(data)
    if text is None:
        raise where.error(
            f"record {index} of {shard}: feature {column!r} is not UTF-8 text: byte 0x{data[bad]:02x} at byte offset "
            f"{bad}; re-prepare the dataset with UTF-8 text"
        )
    return text


def documents(source: DocumentSource) -> list[str]:
    """The documents of a ``tfds:`` source in TFDS's order (at most ``max_documents`` read when set)."""
    try:
        spec = parse(source.path)
    except ValueError as e:
        raise DataError(f"data.{source.label}.path={source.path.strip()!r}: {e}") from None
    where = _Where(source)
    info = _builder(where, spec).info
    column = _column(where, info)
    file_format = info.file_format.value if info.file_format is not None else "unknown"
    if file_format not in _READABLE:
        raise where.error(
            f"{info.full_name} is prepared in the {file_format} format, which jaxunlearn does not read: prepare it "
            f"with --file_format=array_record (or parquet, tfrecord)"
        )
    docs: list[str] = []
    limit = source.max_documents or None
    for instruction in _file_instructions(where, spec, info):
        shard = _local_shard(where, instruction.filename)
        for offset, record in enumerate(_records(where, file_format, shard, instruction)):
            index = instruction.skip + offset
            try:
                example = info.features.deserialize_example_np(record)
            except Exception as e:  # protobuf and TFDS raise many types for a damaged record
                raise where.error(f"record {index} of {shard} is not a TFDS example ({type(e).__name__}: {e})") from e
            docs.append(_text(where, example[column], column, shard, index))
            if limit and len(docs) >= limit:
                return docs
    return docs
