"""Documents, chunking and its cache, per-step batches: against hand computations."""

import json
import os
import re
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxunlearn.data import DataError, DocumentSource, StepBatcher, load_chunks, load_documents, tokenize_and_chunk
from jaxunlearn.data import chunks as chunks_module
from jaxunlearn.data.arrays import Chunks
from tests.tiny_models import make_tokenizer


class CharTokenizer:
    """Token id = 10 + letter index; whitespace dropped. Easy to check chunk boundaries by hand."""

    pad_token_id = 0
    eos_token_id = 2
    all_special_ids = [0, 1, 2]

    def __len__(self):
        return 40

    def get_vocab(self):
        return {chr(97 + i): 10 + i for i in range(26)}

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        ids = [[1] * add_special_tokens + [10 + ord(c) - 97 for c in t if c.isalpha()] for t in texts]
        return {"input_ids": ids}


def _src(path, **kw):
    return DocumentSource(label="forget", path=str(path), **kw)


def test_chunking_matches_hand_computation():
    tok = CharTokenizer()
    docs = ["abcdefghij", "abc", "abcdefgh"]  # with BOS: 11, 4 and 9 tokens
    ch = tokenize_and_chunk(docs, tok, max_length=4, min_tokens=2)
    # doc 0: [1 a b c] [d e f g] [h i j] ; doc 1: [1 a b c] ; doc 2: [1 a b c] [d e f g] [h] <- dropped (1 < 2)
    a, b, c, d, e, f, g, h, i, j = range(10, 20)
    expected = [[1, a, b, c], [d, e, f, g], [h, i, j, 0], [1, a, b, c], [1, a, b, c], [d, e, f, g]]
    np.testing.assert_array_equal(ch.tokens, expected)
    np.testing.assert_array_equal(ch.lengths, [4, 4, 3, 4, 4, 4])
    np.testing.assert_array_equal(ch.doc_index, [0, 0, 0, 1, 2, 2])
    np.testing.assert_array_equal(ch.mask[2], [1, 1, 1, 0])
    no_bos = tokenize_and_chunk(["abcde"], tok, max_length=4, min_tokens=5, add_special_tokens=False)
    assert len(no_bos) == 0  # [a b c d] [e]: neither has 5 tokens


def test_local_formats_and_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"content": "three"}, {"content": "four"}]))
    pq.write_table(pa.table({"content": ["five", "six"], "meta": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("seven\neight")
    assert load_documents(_src(tmp_path / "a.jsonl")) == ["one", "two"]
    assert load_documents(_src(tmp_path / "b.json")) == ["three", "four"]
    assert load_documents(_src(tmp_path / "c.parquet")) == ["five", "six"]
    assert load_documents(_src(tmp_path)) == ["one", "two", "three", "four", "five", "six", "seven\neight"]
    assert load_documents(_src(tmp_path, max_documents=3)) == ["one", "two", "three"]
    with pytest.raises(DataError, match=r"data.forget: column 'body' not found .*columns: content, meta"):
        load_documents(_src(tmp_path / "c.parquet", column="body"))
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(DataError, match="has no 'text' or 'content' column"):
        load_documents(_src(tmp_path / "bad.jsonl"))


def test_empty_forget_set_and_missing_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="data.forget: .*empty.jsonl has no documents"):
        load_chunks(_src(tmp_path / "empty.jsonl"), CharTokenizer(), 8, cache_dir="")
    with pytest.raises(DataError, match="could not be loaded from the Hugging Face Hub"):
        load_documents(DocumentSource("retain", "llmunlearn/unlearn_dataset", "arxiv", "retain"))
    with pytest.raises(DataError, match="data.forget.path is empty"):
        load_documents(DocumentSource("forget", ""))


def test_chunk_cache_is_reused_keyed_and_repaired(tmp_path, monkeypatch):
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps({"text": "the quick brown fox " * 5}) for _ in range(3)))
    tok = make_tokenizer()
    calls = []
    real = chunks_module.tokenize_and_chunk
    monkeypatch.setattr(chunks_module, "tokenize_and_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    first = load_chunks(_src(tmp_path / "f.jsonl"), tok, 8, cache_dir=cache)
    second = load_chunks(_src(tmp_path / "f.jsonl"), tok, 8, cache_dir=cache)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.tokens, second.tokens)
    load_chunks(_src(tmp_path / "f.jsonl"), tok, 16, cache_dir=cache)  # another length: another entry
    assert len(calls) == 2 and len(list((cache / "chunks").glob("*.npz"))) == 2
    for entry in (cache / "chunks").glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:100])  # truncate: corrupted
    repaired = load_chunks(_src(tmp_path / "f.jsonl"), tok, 8, cache_dir=cache)
    assert len(calls) == 3
    np.testing.assert_array_equal(repaired.tokens, first.tokens)
    (tmp_path / "f.jsonl").write_text(json.dumps({"text": "a different document entirely"}))
    load_chunks(_src(tmp_path / "f.jsonl"), tok, 8, cache_dir=cache)  # new content: re-tokenised
    assert len(calls) == 4


def _chunks(n, length=4):
    return Chunks(
        np.arange(n * length, dtype=np.int32).reshape(n, length),
        np.full(n, length, np.int32),
        np.arange(n, dtype=np.int32),
        n,
    )


def test_batches_cover_each_forget_chunk_once_per_epoch_and_are_deterministic():
    b = StepBatcher(_chunks(13), _chunks(5), micro_batch_size=2, grad_accum_steps=2, seed=3)
    assert b.steps_per_epoch == 3  # 13 // 4; the last partial step is dropped
    epoch0 = np.concatenate([b.forget_indices(s) for s in range(3)])
    epoch1 = np.concatenate([b.forget_indices(s) for s in range(3, 6)])
    assert len(set(epoch0)) == 12 and len(set(epoch1)) == 12
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    again = StepBatcher(_chunks(13), _chunks(5), 2, 2, seed=3)
    np.testing.assert_array_equal(again.forget_indices(4), b.forget_indices(4))
    retain = np.concatenate([b.retain_indices(s) for s in range(5)])  # 20 = 4 passes over 5 retain chunks
    for k in range(4):
        assert sorted(retain[5 * k : 5 * k + 5]) == [0, 1, 2, 3, 4]
    batch = b.batch(1)
    assert batch["forget"]["tokens"].shape == (2, 2, 4) and batch["retain"]["chunk_id"].shape == (2, 2)
    np.testing.assert_array_equal(batch["forget"]["chunk_id"].ravel(), b.forget_indices(1))
    with pytest.raises(DataError, match="forget set has 3 chunks but one step takes"):
        StepBatcher(_chunks(3), None, 2, 2, seed=0)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_chunk_cache_permissions_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    (tmp_path / "f.jsonl").write_text(json.dumps({"text": "abcdefgh"}))
    cache = tmp_path / "shared"
    old = os.umask(umask)
    try:
        load_chunks(_src(tmp_path / "f.jsonl"), CharTokenizer(), 4, min_tokens=2, cache_dir=cache)
    finally:
        os.umask(old)
    (entry,) = (cache / "chunks").iterdir()  # one entry, no temporary file left behind
    assert entry.suffix == ".npz"
    assert stat.S_IMODE(entry.stat().st_mode) == file_mode
    assert stat.S_IMODE((cache / "chunks").stat().st_mode) == dir_mode
    assert stat.S_IMODE(cache.stat().st_mode) == dir_mode


def test_an_unwritable_chunk_cache_is_skipped_with_a_warning(tmp_path, monkeypatch):
    warnings = []  # captured here: engine.configure_logging stops jaxunlearn's records from reaching caplog
    monkeypatch.setattr(chunks_module.log, "warning", lambda msg, *args: warnings.append(msg % args))
    (tmp_path / "f.jsonl").write_text(json.dumps({"text": "abcdefgh"}))
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("")  # cache/chunks cannot be created, even by root
    chunks = load_chunks(_src(tmp_path / "f.jsonl"), CharTokenizer(), 4, min_tokens=2, cache_dir=not_a_dir)
    a, b, c, d, e, f, g, h = range(10, 18)  # [1 a b c] [d e f g] [h]: the last is dropped (1 < 2)
    np.testing.assert_array_equal(chunks.tokens, [[1, a, b, c], [d, e, f, g]])
    (warning,) = warnings
    assert re.fullmatch(
        rf"cannot write the chunk cache {not_a_dir}/chunks/[0-9a-f]{{32}}\.npz \(.+\); continuing without it", warning
    )
