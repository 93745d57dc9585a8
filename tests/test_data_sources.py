"""Where documents come from: local copies of Hub datasets, and files that cannot be read (refused, never guessed)."""

import gzip
import json

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
