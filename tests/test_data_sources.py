"""Where documents come from: local copies of Hub datasets, TensorFlow Datasets prepared on disk (no TensorFlow), and
files that cannot be read (refused, never guessed)."""

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxunlearn.data import DataError, DocumentSource, load_chunks, load_documents
from tests.test_data import CharTokenizer

# The layout of llmunlearn/unlearn_dataset: arXiv and GitHub have a `text` column, the general corpus `content`.
LAYOUT = {
    "arxiv": ("text", ("forget", "approximate", "retain")),
    "github": ("text", ("forget", "approximate", "retain")),
    "general": ("content", ("evaluation", "retain")),
}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files `datasets` prepares out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _docs(config, split, n):
    return [f"{config} {split} document {i}" for i in range(n)]


def _write_card(root):
    """A README.md whose front matter declares the configurations, as the Hub dataset's card does."""
    lines = ["---", "configs:"]
    for config, (_, splits) in LAYOUT.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*lines, "---", "# Unlearning data", ""]))


@pytest.fixture
def hub_copy(tmp_path):
    """A small local copy of the paper's dataset: distinct documents in every split, arxiv/forget in two shards."""
    root = tmp_path / "unlearn_dataset"
    for config, (column, splits) in LAYOUT.items():
        (root / config).mkdir(parents=True)
        for k, split in enumerate(splits):
            pq.write_table(
                pa.table({column: _docs(config, split, 2 + k)}), root / config / f"{split}-00000-of-00001.parquet"
            )
    (root / "arxiv" / "forget-00000-of-00001.parquet").unlink()
    pq.write_table(pa.table({"text": ["arxiv forget document 0"]}), root / "arxiv" / "forget-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": ["arxiv forget document 1"]}), root / "arxiv" / "forget-00001-of-00002.parquet")
    _write_card(root)
    return root


def _src(path, name="", split="", **kw):
    return DocumentSource(label="forget", path=str(path), name=name, split=split, **kw)


def test_local_copy_of_a_hub_dataset_reads_exactly_the_configured_split(hub_copy):
    assert load_documents(_src(hub_copy, "arxiv", "forget")) == ["arxiv forget document 0", "arxiv forget document 1"]
    assert load_documents(_src(hub_copy, "arxiv", "approximate")) == [
        "arxiv approximate document 0",
        "arxiv approximate document 1",
        "arxiv approximate document 2",
    ]
    assert load_documents(_src(hub_copy, "github", "retain", max_documents=3)) == [
        "github retain document 0",
        "github retain document 1",
        "github retain document 2",
    ]
    assert load_documents(_src(hub_copy, "general", "evaluation")) == [  # the `content` column
        "general evaluation document 0",
        "general evaluation document 1",
    ]
    chunks = load_chunks(_src(hub_copy, "arxiv", "forget"), CharTokenizer(), 64, cache_dir="")
    assert chunks.num_documents == 2


def test_a_selection_that_selects_nothing_is_refused_with_what_exists(hub_copy, tmp_path):
    listing = "arxiv (forget, approximate, retain), github (forget, approximate, retain), general (evaluation, retain)"
    with pytest.raises(DataError) as e:
        load_documents(_src(hub_copy, "wiki", "forget"))
    assert str(e.value) == f"data.forget: {hub_copy} has no configuration 'wiki'; it has: {listing}"
    with pytest.raises(DataError) as e:
        load_documents(_src(hub_copy, "general", "forget"))
    assert str(e.value) == (
        f"data.forget: {hub_copy} configuration 'general' has no split 'forget'; it has: general (evaluation, retain)"
    )
    with pytest.raises(DataError, match=r"configuration 'arxiv' has no split 'train'"):
        load_documents(_src(hub_copy, "arxiv"))  # no split: `train`, as for a Hub id
    with pytest.raises(DataError) as e:  # reading the whole card would mix every split: refused
        load_documents(_src(hub_copy))
    assert str(e.value) == (
        f"data.forget: {hub_copy} has several configurations: set data.forget.name; it has: {listing}"
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    with pytest.raises(DataError) as e:
        load_documents(_src(plain, "arxiv", "forget"))
    assert str(e.value) == (
        f"data.forget: {plain} has no configuration 'arxiv'; it has: default (train) "
        "(a plain directory is read whole when data.forget.name and .split are both empty)"
    )
    assert load_documents(_src(plain)) == ["one"]
    # A single file is one split already: `name`/`split` left from the paper's defaults are ignored, as before.
    assert load_documents(_src(plain / "a.jsonl", "arxiv", "forget")) == ["one"]


def _not_utf8(path, byte, offset, line):
    return rf"^data\.forget: {path} is not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} \(line {line}\)"


def test_text_that_is_not_utf8_is_refused_with_file_and_offset(tmp_path):
    latin_jsonl = tmp_path / "latin.jsonl"  # 15 bytes of line 1, then '{"text": "caf' (13 bytes): é at 28
    latin_jsonl.write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    latin_json = tmp_path / "latin.json"
    latin_json.write_bytes('["naïve"]'.encode("latin-1"))  # ï at 4
    latin_txt = tmp_path / "latin.txt"
    latin_txt.write_bytes("Hello\nGrüße".encode("latin-1"))  # ü at 8
    gzipped = tmp_path / "packed.jsonl"  # a gzip file without its .gz: magic 1f 8b
    gzipped.write_bytes(gzip.compress(b'{"text": "x"}\n'))
    image = tmp_path / "image.txt"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    utf16 = tmp_path / "utf16.txt"  # valid UTF-8 byte for byte, but the NULs make it binary
    utf16.write_bytes("hi".encode("utf-16-le"))
    cases = [(latin_jsonl, 0xE9, 28, 2), (latin_json, 0xEF, 4, 1), (latin_txt, 0xFC, 8, 2)]
    cases += [(gzipped, 0x8B, 1, 1), (image, 0x89, 0, 1), (utf16, 0x00, 1, 1)]
    for path, byte, offset, line in cases:
        with pytest.raises(DataError, match=_not_utf8(path, byte, offset, line)):
            load_documents(_src(path))
    with pytest.raises(DataError, match=_not_utf8(latin_jsonl, 0xE9, 28, 2)):
        load_chunks(_src(latin_jsonl), CharTokenizer(), 8, cache_dir=tmp_path / "cache")


def test_text_is_read_as_before(tmp_path):
    (tmp_path / "crlf.txt").write_bytes("a\r\nb\rc é\n".encode())
    assert load_documents(_src(tmp_path / "crlf.txt")) == ["a\nb\nc é\n"]  # universal newlines, as read_text


def _damage_pages(path):
    """Flip bytes of the first data page's header: the footer (schema) still reads, the rows do not."""
    start = pq.read_metadata(path).row_group(0).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 20 : start + 60] = bytes(b ^ 0xFF for b in data[start + 20 : start + 60])
    path.write_bytes(bytes(data))


def test_corrupt_parquet_is_refused_with_the_file(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a document"] * 50}), good)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:100])
    noise = tmp_path / "noise.parquet"
    noise.write_bytes(bytes(range(256)) * 4)
    for path in (truncated, noise):
        with pytest.raises(DataError, match=rf"^data\.forget: {path} is not a readable Parquet file \(ArrowInvalid: "):
            load_documents(_src(path))
    damaged = tmp_path / "pages" / "damaged.parquet"
    damaged.parent.mkdir()
    pq.write_table(pa.table({"text": ["a document"] * 50}), damaged)
    _damage_pages(damaged)
    with pytest.raises(DataError, match=rf"^data\.forget: {damaged} is not a readable Parquet file \(OSError: "):
        load_documents(_src(damaged))
    with pytest.raises(DataError, match=rf"^data\.forget: {noise} is not a readable Parquet file"):  # sorted: 1st bad
        load_chunks(_src(tmp_path), CharTokenizer(), 8, cache_dir=tmp_path / "cache")


def test_a_hub_copy_with_a_bad_file_names_it_and_other_splits_do_not_matter(hub_copy):
    bad = hub_copy / "arxiv" / "retain-00000-of-00001.parquet"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(DataError, match=rf"^data\.forget: {bad} is not a readable Parquet file"):
        load_documents(_src(hub_copy, "arxiv", "retain"))
    assert load_documents(_src(hub_copy, "github", "forget")) == [
        "github forget document 0",
        "github forget document 1",
    ]
    text_copy = hub_copy.parent / "text_copy"
    (text_copy / "data").mkdir(parents=True)
    (text_copy / "data" / "forget.jsonl").write_bytes('{"text": "résumé"}\n'.encode("latin-1"))  # é at 11
    (text_copy / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: forget\n    path: data/forget.jsonl\n---\n"
    )
    with pytest.raises(DataError, match=_not_utf8(text_copy / "data" / "forget.jsonl", 0xE9, 11, 1)):
        load_chunks(_src(text_copy, split="forget"), CharTokenizer(), 8, cache_dir="")


# --- TensorFlow Datasets ------------------------------------------------------------------------------------

# What the tiny TFDS builder below generates, known here independently of TFDS: two configs, two splits each.
TINY_BOOKS = {
    "novels": {
        "train": [f"Novel {i}: the whale, the sea and café number {i}." for i in range(6)],
        "test": ["Unseen novel A, naïve.", "Unseen novel B, 北京."],
    },
    "poems": {
        "train": [f"Poem {i}, a sonnet in fourteen lines." for i in range(4)],
        "test": ["Unseen poem."],
    },
}


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time (the reader under test uses a table)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _write_tfrecord(cls, path, iterator):
    """TFDS writes TFRecord shards with tf.io.TFRecordWriter; TensorFlow is not installed, so write the same
    framing here (length, masked CRC32C of the length, data, masked CRC32C of the data)."""
    import struct

    with open(path, "wb") as f:
        for _, record in iterator:
            header = struct.pack("<Q", len(record))
            f.write(header + struct.pack("<I", _masked(header)) + record + struct.pack("<I", _masked(record)))


# TFDS 4.9.10 looks for a builder's checksums next to its code; for a class in a package module (tests.*) that
# lookup imports the importlib_resources backport, which TFDS does not install. A one-part module name skips it.
OUTSIDE_A_PACKAGE = "tiny_tfds_builders"


def _tiny_builder(books, *, shuffled=False, name="tiny_books"):
    """A TFDS GeneratorBasedBuilder class generating ``books[config][split]`` (unshuffled: stored in generation
    order, so slices are known here)."""
    import numpy as np
    import tensorflow_datasets as tfds

    class TinyBooks(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        __module__ = OUTSIDE_A_PACKAGE
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in books]

        def _info(self):
            features = {"book_text": tfds.features.Text(), "book_id": np.int32, "title": np.str_}
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=not shuffled
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in books[self.builder_config.name]}

        def _generate_examples(self, split):
            for i, text in enumerate(books[self.builder_config.name][split]):
                yield i, {"book_text": text, "book_id": i, "title": f"{split} {i}"}

    TinyBooks.name = name
    return TinyBooks


def _prepare(builder_cls, data_dir, file_format, configs=None):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters

    tfds.disable_progress_bar()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(file_adapters.TfRecordFileAdapter, "write_examples", classmethod(_write_tfrecord))
        for config in configs or [c.name for c in builder_cls.BUILDER_CONFIGS]:
            builder = builder_cls(config=config, data_dir=str(data_dir), file_format=file_format)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


FORMATS = ("array_record", "parquet", "tfrecord")


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    """The tiny builder's data prepared in each file format TFDS writes, one data_dir each."""
    assert _crc32c_bitwise(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    builder = _tiny_builder(TINY_BOOKS)
    return {f: _prepare(builder, tmp_path_factory.mktemp(f"tfds_{f}"), f) for f in FORMATS}


def _tfds(path, data_dir, column="book_text", **kw):
    return DocumentSource(label="forget", path=path, tfds_data_dir=str(data_dir), column=column, **kw)


@pytest.mark.parametrize("file_format", FORMATS)
def test_a_tfds_selection_yields_exactly_the_generated_documents(tfds_dirs, file_format):
    data_dir = tfds_dirs[file_format]
    for config, splits in TINY_BOOKS.items():
        for split, books in splits.items():
            assert load_documents(_tfds(f"tfds:tiny_books/{config}:{split}", data_dir)) == books
    novels = TINY_BOOKS["novels"]
    # TFDS split slicing: absolute, negative, percent, sums, a pinned version; max_documents on top.
    assert load_documents(_tfds("tfds:tiny_books/novels:train[1:4]", data_dir)) == novels["train"][1:4]
    assert load_documents(_tfds("tfds:tiny_books/novels:train[-2:]", data_dir)) == novels["train"][-2:]
    assert load_documents(_tfds("tfds:tiny_books/novels:train[:50%]", data_dir)) == novels["train"][:3]
    both = load_documents(_tfds("tfds:tiny_books/poems:test+train[2:]", data_dir))
    assert both == TINY_BOOKS["poems"]["test"] + TINY_BOOKS["poems"]["train"][2:]
    assert load_documents(_tfds("tfds:tiny_books/poems:1.0.0:train[:2]", data_dir)) == TINY_BOOKS["poems"]["train"][:2]
    assert load_documents(_tfds("tfds:tiny_books/novels:train", data_dir, max_documents=2)) == novels["train"][:2]
    # No config: TFDS's default (the first), recorded in the data_dir's metadata.
    assert load_documents(_tfds("tfds:tiny_books:test", data_dir)) == novels["test"]
    source = _tfds("tfds:tiny_books/novels:train[1:4]", data_dir, name="arxiv", split="forget")  # both ignored
    assert load_documents(source) == novels["train"][1:4]
    assert source.describe() == f"tfds:tiny_books/novels:train[1:4] (TFDS data_dir {data_dir})"
    chunks = load_chunks(_tfds("tfds:tiny_books/novels:test", data_dir), CharTokenizer(), 8, cache_dir="")
    assert chunks.num_documents == 2


def test_the_default_tfds_data_dir_is_tfds_own(tfds_dirs, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dirs["array_record"]))
    source = DocumentSource(label="forget", path="tfds:tiny_books/poems:test", column="book_text")
    assert load_documents(source) == TINY_BOOKS["poems"]["test"]
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", "/nonexistent-home")
    with pytest.raises(DataError, match=r"the TFDS data_dir /nonexistent-home/tensorflow_datasets does not exist"):
        load_documents(source)


def test_a_tfds_selection_that_selects_nothing_names_the_culprit(tfds_dirs, tmp_path):
    data_dir = tfds_dirs["array_record"]

    def refused(path, data_dir=data_dir, **kw):
        with pytest.raises(DataError) as e:
            load_documents(_tfds(path, data_dir, **kw))
        assert "\n" not in str(e.value)
        return str(e.value)

    missing = tmp_path / "nowhere"
    message = refused("tfds:pg19:train", missing)
    assert message.startswith(f"data.forget: tfds:pg19:train: the TFDS data_dir {missing} does not exist ")
    assert "(data.forget.tfds_data_dir)" in message and "tfds build pg19 --data_dir=DIR" in message
    assert "nothing is downloaded" in message
    assert refused("tfds:pg19:train") == (
        f"data.forget: tfds:pg19:train: no dataset 'pg19' is prepared in the TFDS data_dir {data_dir} "
        "(prepared there: tiny_books); nothing is downloaded at run time: prepare it on a machine with network "
        "access and TensorFlow (pip install tensorflow tensorflow-datasets; tfds build pg19 --data_dir=DIR), then "
        f"copy DIR/pg19 into {data_dir} or point data.forget.tfds_data_dir (default $TFDS_DATA_DIR, else "
        "~/tensorflow_datasets) at DIR"
    )
    message = refused("tfds:tiny_books/plays:train")
    assert message.startswith(
        f"data.forget: tfds:tiny_books/plays:train: dataset 'tiny_books' in {data_dir} has no config 'plays' "
        "prepared (configs there: novels, poems); nothing is downloaded at run time: prepare it"
    )
    assert "tfds build tiny_books/plays --data_dir=DIR" in message
    assert refused("tfds:tiny_books/novels:validation") == (
        "data.forget: tfds:tiny_books/novels:validation: tiny_books/novels/1.0.0 has no split 'validation' "
        "(splits: train, test)"
    )
    assert refused("tfds:tiny_books/novels:test+valid[:1]").endswith("has no split 'valid' (splits: train, test)")
    assert refused("tfds:tiny_books/novels:train[:10]") == (
        "data.forget: tfds:tiny_books/novels:train[:10]: split 'train[:10]' of tiny_books/novels/1.0.0: "
        "Requested slice [:10] incompatible with 6 examples."
    )
    assert refused("tfds:tiny_books/novels:2.0.0:train") == (
        f"data.forget: tfds:tiny_books/novels:2.0.0:train: {data_dir}/tiny_books/novels has no version 2.0.0 "
        "(versions there: 1.0.0)"
    )
    assert refused("tfds:tiny_books/novels:train", column="book_id") == (
        "data.forget: tfds:tiny_books/novels:train: feature 'book_id' of tiny_books/novels/1.0.0 is not text "
        "(Tensor, shape (), int32); set data.forget.column to a text feature (text features: book_text, title)"
    )
    assert refused("tfds:tiny_books/novels:train", column="body") == (
        "data.forget: column 'body' not found in tfds:tiny_books/novels:train (features of tiny_books/novels/1.0.0) "
        "(columns: book_id, book_text, title)"
    )
    assert refused("tfds:tiny_books/novels:train", column="") == (
        "data.forget: tfds:tiny_books/novels:train (features of tiny_books/novels/1.0.0) has no 'text' or "
        "'content' column (columns: book_id, book_text, title); set data.forget.column"
    )
    assert refused("tfds:tiny_books/novels:train[", column="book_text").startswith(
        "data.forget.path='tfds:tiny_books/novels:train[': 'train[' is not a TFDS split expression"
    )
    # Two configs and no default recorded: the selection must name one.
    (data_dir / "tiny_books" / ".config" / "metadata.json").rename(tmp_path / "metadata.json")
    try:
        assert refused("tfds:tiny_books:train", column="book_text") == (
            f"data.forget: tfds:tiny_books:train: dataset 'tiny_books' in {data_dir} has several configs: write "
            "tfds:tiny_books/CONFIG:train (configs there: novels, poems)"
        )
    finally:
        (tmp_path / "metadata.json").rename(data_dir / "tiny_books" / ".config" / "metadata.json")
    # An interrupted preparation (TFDS's incomplete.* directory) is not a prepared dataset.
    interrupted = tmp_path / "interrupted"
    (interrupted / "tiny_books" / "novels" / "incomplete.ABC123_1.0.0").mkdir(parents=True)
    assert "holds no complete prepared version (an interrupted preparation leaves incomplete.* directories)" in (
        refused("tfds:tiny_books/novels:train", interrupted, column="book_text")
    )


def test_tfds_text_that_is_not_utf8_is_refused_with_the_record(tmp_path):
    books = {"latin": {"train": ["fine", "caf\xe9".encode("latin-1"), "also fine"]}}  # é at byte 3
    data_dir = _prepare(_tiny_builder(books), tmp_path / "tfds", "array_record")
    shard = data_dir / "tiny_books" / "latin" / "1.0.0" / "tiny_books-train.array_record-00000-of-00001"
    with pytest.raises(DataError) as e:
        load_documents(_tfds("tfds:tiny_books/latin:train", data_dir, column="book_text"))
    assert str(e.value) == (
        f"data.forget: tfds:tiny_books/latin:train: record 1 of {shard}: feature 'book_text' is not UTF-8 text: "
        "byte 0xe9 at byte offset 3; re-prepare the dataset with UTF-8 text"
    )
    assert load_documents(_tfds("tfds:tiny_books/latin:train[:1]", data_dir)) == ["fine"]  # only what is read


def test_damaged_tfds_shards_are_refused_with_the_file(tfds_dirs, tmp_path):
    import shutil

    for file_format, problem in [
        ("tfrecord", "is truncated: record 5 at byte offset"),
        ("array_record", "is not a readable ArrayRecord shard (no readable records, dataset_info.json says 6)"),
        ("parquet", "is not a readable Parquet shard (ArrowInvalid"),
    ]:
        data_dir = tmp_path / file_format
        shutil.copytree(tfds_dirs[file_format], data_dir)
        shard = next((data_dir / "tiny_books" / "novels" / "1.0.0").glob("tiny_books-train.*"))
        shard.write_bytes(shard.read_bytes()[:-20])
        with pytest.raises(
            DataError, match=rf"^data\.forget: tfds:tiny_books/novels:train: {re.escape(f'{shard} {problem}')}"
        ):
            load_documents(_tfds("tfds:tiny_books/novels:train", data_dir))
    shard = next((tmp_path / "tfrecord" / "tiny_books" / "novels" / "1.0.0").glob("tiny_books-train.*"))
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="is not a TFRecord file or is damaged: bad length checksum of record 0"):
        load_documents(_tfds("tfds:tiny_books/novels:train", tmp_path / "tfrecord"))


def test_the_chunk_cache_key_follows_the_tfds_data(tfds_dirs, tmp_path):
    cache = tmp_path / "cache"
    source = _tfds("tfds:tiny_books/novels:train", tfds_dirs["tfrecord"])
    first = load_chunks(source, CharTokenizer(), 16, cache_dir=cache)
    assert len(list((cache / "chunks").glob("*.npz"))) == 1
    again = load_chunks(
        _tfds("tfds:tiny_books/novels:train", tfds_dirs["parquet"]), CharTokenizer(), 16, cache_dir=cache
    )
    assert len(list((cache / "chunks").glob("*.npz"))) == 1  # the same documents in another format: a cache hit
    assert (again.tokens == first.tokens).all()
    changed = {"novels": {"train": [*TINY_BOOKS["novels"]["train"][:-1], "A different last novel."]}}
    rebuilt = _prepare(_tiny_builder(changed), tmp_path / "rebuilt", "tfrecord")  # same name, config, version
    load_chunks(_tfds("tfds:tiny_books/novels:train", rebuilt), CharTokenizer(), 16, cache_dir=cache)
    assert len(list((cache / "chunks").glob("*.npz"))) == 2


def test_a_tfds_data_dir_at_a_url_mirrors_only_the_shards_read(tfds_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXUNLEARN_CACHE", str(tmp_path / "cache"))
    data_dir = tfds_dirs["array_record"]
    source = _tfds("tfds:tiny_books/poems:test", f"file://{data_dir}")
    assert load_documents(source) == TINY_BOOKS["poems"]["test"]
    mirror = tmp_path / "cache" / "remote" / "file" / str(data_dir).lstrip("/") / "tiny_books" / "poems" / "1.0.0"
    shards = [p.name for p in mirror.iterdir() if p.name.endswith("-00000-of-00001")]
    assert shards == ["tiny_books-test.array_record-00000-of-00001"]  # not the train shard
    assert source.describe() == f"tfds:tiny_books/poems:test (TFDS data_dir file://{data_dir})"


def _pg19_builder():
    """A stand-in for TFDS's pg19: its name, version, splits and features, a few short books, shuffled as TFDS
    stores it."""
    import numpy as np
    import tensorflow_datasets as tfds

    books = {
        "train": [f"Train book {i} of the old library." for i in range(160)],
        "validation": ["Validation book 0.", "Validation book 1."],
        "test": [f"Test book {i}, not in train." for i in range(5)],
    }

    class Pg19(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        __module__ = OUTSIDE_A_PACKAGE
        VERSION = tfds.core.Version("0.1.1")

        def _info(self):
            features = {"book_text": tfds.features.Text(), "book_id": np.int32, "book_title": np.str_}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in books}

        def _generate_examples(self, split):
            for i, text in enumerate(books[split]):
                key = 1000 * len(split) + i
                yield key, {"book_text": text, "book_id": key, "book_title": f"{split} {i}"}

    return Pg19, books


def test_the_books_preset_reads_pg19_from_a_tfds_data_dir(tmp_path):
    from jaxunlearn.config import PAPER_DATASET, validate
    from tests.tiny_models import load_config_file

    builder, books = _pg19_builder()
    data_dir = _prepare(builder, tmp_path / "tensorflow_datasets", "array_record", configs=[None])
    config = load_config_file("ga_kl", "books")
    config.model.path = "01-ai/Yi-6B"
    for split in ("forget", "retain", "approximate"):
        config.data[split].tfds_data_dir = str(data_dir)
    validate(config)
    d = config.data
    assert (d.max_length, d.min_chunk_tokens) == (4096, 5)  # the paper's chunking
    assert (d.general.path, d.general.name, d.general.split) == (PAPER_DATASET, "general", "evaluation")
    docs = {s: load_documents(DocumentSource.from_config(s, d[s])) for s in ("forget", "retain", "approximate")}
    stored = load_documents(_tfds("tfds:pg19:train", data_dir, column="book_text"))
    assert sorted(stored) == sorted(books["train"]) and stored != books["train"]  # TFDS's hashed order
    assert docs["forget"] == stored[:50]  # a fixed pseudo-random sample of the train books
    assert docs["retain"] == stored[50:150]  # other train books
    assert sorted(docs["approximate"]) == sorted(books["test"])  # unseen books
    general = load_config_file("ga_kl_general", "books").data.retain
    assert (general.path, general.name, general.split) == (PAPER_DATASET, "general", "retain")


# --- Python's own text: python:modules:... and python:topics -------------------------------------------------


def test_python_modules_are_their_source_files_found_without_importing(tmp_path, monkeypatch):
    import sys

    package = tmp_path / "toypkg"
    (package / "tests").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")  # importing it would fail
    (package / "core.py").write_text("def core():\n    return 1\n")
    (package / "test_core.py").write_text("def test(): pass\n")
    (package / "tests" / "test_more.py").write_text("x = 1\n")
    (tmp_path / "single.py").write_text("VALUE = 'single'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = DocumentSource("forget", "python:modules:single,toypkg")
    assert load_documents(source) == [
        "VALUE = 'single'\n",
        "raise RuntimeError('imported')\n",
        "def core():\n    return 1\n",
    ]
    assert "toypkg" not in sys.modules
    assert load_documents(DocumentSource("forget", "python:modules:toypkg.core")) == ["def core():\n    return 1\n"]
    assert load_documents(DocumentSource("forget", "python:modules:single,toypkg[1:]")) == [
        "raise RuntimeError('imported')\n",
        "def core():\n    return 1\n",
    ]
    import bisect

    stdlib = load_documents(DocumentSource("forget", "python:modules:bisect"))
    assert stdlib == [open(bisect.__file__, encoding="utf-8").read()]


def test_python_topics_are_the_language_reference_and_slices_split_them():
    from pydoc_data.topics import topics

    everything = load_documents(DocumentSource("general", "python:topics"))
    assert everything == list(dict.fromkeys(topics[k] for k in sorted(topics) if topics[k].strip()))
    assert len(set(topics.values())) < len(topics)  # aliases share a text (why it dedupes)
    even = load_documents(DocumentSource("general", "python:topics[::2]"))
    odd = load_documents(DocumentSource("general", "python:topics[1::2]"))
    assert even == everything[::2] and odd == everything[1::2] and not set(even) & set(odd)


@pytest.mark.parametrize(
    "path, match",
    [
        ("python:modules:no_such_module_here", r"data.forget.path='python:modules:no_such_module_here': module "),
        ("python:modules:sys", r"module 'sys' has no Python source \(built-in\)"),
        ("python:modules:", r"names no module"),
        ("python:stdlib", r"write python:modules:NAME\[,NAME...\] or python:topics"),
        ("python:topics[::0]", r"a slice step cannot be zero"),
    ],
)
def test_a_python_path_that_names_nothing_is_refused(path, match):
    with pytest.raises(DataError, match=match):
        load_documents(DocumentSource("forget", path))
