"""Tokenise documents and cut them into fixed-length chunks, cached on disk.

As in the official code: each document is tokenised whole (only the special tokens the tokenizer itself adds),
then cut into consecutive non-overlapping ``max_length``-token chunks; chunks shorter than ``min_tokens``
tokens are dropped; the rest are right-padded with a mask. Documents are never packed together.

With ``first_only`` (RMU's official WMDP data, ``data.first_tokens``) each non-empty document gives one chunk,
its first ``max_length`` tokens as the tokenizer's own truncation cuts them (``truncation=True`` on the right, the
special tokens kept), however short.

Chunks are cached under ``<cache_dir>/chunks/<key>.npz``, where the key hashes the tokenizer, the documents'
content, ``max_length``, ``min_tokens`` and ``add_special_tokens``: a re-run skips tokenisation, and any change
to one of them builds a new entry. Cache files are plain arrays (``allow_pickle=False``) written atomically,
with the permissions the umask gives (0644 under the usual 022), so a shared cache directory works.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import jaxunlearn.data.qa as qa
from jaxunlearn.data.arrays import Chunks
from jaxunlearn.data.documents import documents_fingerprint, load_documents, load_records
from jaxunlearn.data.source import DataError, DocumentSource
from jaxunlearn.storage import locations

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how the tokenizer maps text to ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token", "all_special_ids")}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenize_and_chunk(
    docs: list[str],
    tokenizer: Any,
    max_length: int,
    *,
    min_tokens: int = 5,
    add_special_tokens: bool = True,
    pad_id: int = 0,
    desc: str = "tokenising",
    first_only: bool = False,
) -> Chunks:
    """Tokenise ``docs`` and cut them into chunks (see the module docstring; ``first_only``: one chunk per non-empty
    document, its first ``max_length`` tokens)."""
    if max_length < 2:
        raise DataError(f"max_length={max_length}: a chunk needs at least 2 tokens")
    pieces: list[np.ndarray] = []
    doc_index: list[int] = []
    batch = 64
    truncation = {"truncation": True, "max_length": max_length} if first_only else {}
    with (
        _truncating_right(tokenizer, first_only),
        tqdm(total=len(docs), desc=desc, unit="doc", disable=None, leave=False) as bar,
    ):
        for start in range(0, len(docs), batch):
            encoded = tokenizer(
                docs[start : start + batch],
                add_special_tokens=add_special_tokens,
                return_attention_mask=False,
                verbose=False,
                **truncation,
            )["input_ids"]
            for offset, ids in enumerate(encoded):
                ids = np.asarray(ids, dtype=np.int32)
                if first_only:  # the official filter len(text) > min_len, min_len 0: every non-empty document
                    if docs[start + offset] and len(ids):
                        pieces.append(ids)
                        doc_index.append(start + offset)
                    continue
                for s in range(0, len(ids), max_length):
                    piece = ids[s : s + max_length]
                    if len(piece) >= min_tokens:
                        pieces.append(piece)
                        doc_index.append(start + offset)
            bar.update(len(encoded))
    tokens = np.full((len(pieces), max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(pieces), dtype=np.int32)
    for i, piece in enumerate(pieces):
        tokens[i, : len(piece)] = piece
        lengths[i] = len(piece)
    return Chunks(tokens, lengths, np.asarray(doc_index, dtype=np.int32), len(docs))


@contextlib.contextmanager
def _truncating_right(tokenizer: Any, on: bool):
    """The tokenizer truncating on the right while ``on`` (the official RMU script sets ``truncation_side``)."""
    side = getattr(tokenizer, "truncation_side", "right")
    if on and side != "right":
        tokenizer.truncation_side = "right"
    try:
        yield
    finally:
        if on and side != "right":
            tokenizer.truncation_side = side


def pad_token_id(tokenizer: Any) -> int:
    """The id chunks are padded with: the tokenizer's pad token, else its EOS, else 0 (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _cache_key(
    source_fp: str,
    tokenizer_fp: str,
    max_length: int,
    min_tokens: int,
    add_special: bool,
    pad_id: int,
    first_only: bool = False,
) -> str:
    fields = [_FORMAT_VERSION, source_fp, tokenizer_fp, max_length, min_tokens, add_special, pad_id]
    payload = json.dumps(fields + (["first_only"] if first_only else []))  # the plain keys are as before
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _read_cache(path: Path, key: str) -> Chunks | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if bytes(f["key"]).decode() != key:
                raise ValueError("key mismatch")
            prompts = f["prompt_lengths"] if "prompt_lengths" in f.files else None
            chunks = Chunks(f["tokens"], f["lengths"], f["doc_index"], int(f["num_documents"]), prompts)
        if not (len(chunks.tokens) == len(chunks.lengths) == len(chunks.doc_index)):
            raise ValueError("inconsistent array lengths")
        return chunks
    except (FileNotFoundError, NotADirectoryError):  # no entry yet (the write below says why, if it fails)
        return None
    except Exception as e:  # truncated or corrupted file: rebuild it
        log.warning("ignoring unreadable chunk cache %s (%s); rebuilding", path, e)
        return None


def _write_cache(path: Path, key: str, chunks: Chunks) -> None:
    """Write atomically, readable as the umask allows (a shared cache), or warn: the cache only saves time."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open applies the umask to 0o666 (0644 under 022); tempfile.mkstemp would make the file 0600.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            np.savez(
                f,
                key=np.frombuffer(key.encode(), dtype=np.uint8),
                tokens=chunks.tokens,
                lengths=chunks.lengths,
                doc_index=chunks.doc_index,
                num_documents=np.asarray(chunks.num_documents),
                **({} if chunks.prompt_lengths is None else {"prompt_lengths": chunks.prompt_lengths}),
            )
        os.replace(tmp, path)
    except OSError as e:  # read-only or full disk, a teammate's directory: run on without caching
        log.warning("cannot write the chunk cache %s (%s); continuing without it", path, e)
    finally:
        with contextlib.suppress(OSError):  # nothing to remove, or no directory to remove it from
            tmp.unlink(missing_ok=True)


def _question_answers(source: DocumentSource) -> list[tuple[str, str]]:
    records = load_records(source, [source.question, source.answer_column])
    text = lambda v: "" if v is None else str(v)  # noqa: E731 (a null answer is empty, not the text "None")
    pairs = [(text(r[source.question]), text(r[source.answer_column])) for r in records]
    kept = [(q, a) for q, a in pairs if a.strip()]  # an empty answer would train on the EOS token alone
    where = f"data.{source.label}: {source.describe()}"
    if pairs and not kept:
        raise DataError(f"{where}: every answer (column {source.answer_column!r}) is empty; nothing to train on")
    if len(kept) < len(pairs):
        log.warning(
            "%s: %d of %d answers are empty; those pairs are dropped", where, len(pairs) - len(kept), len(pairs)
        )
    return kept


def _tokenize(
    label: str,
    docs: list[str],
    pairs: list[tuple[str, str]] | None,
    tokenizer: Any,
    max_length: int,
    min_tokens: int,
    add_special_tokens: bool,
    pad_id: int,
    qa_template: str,
    first_only: bool = False,
) -> Chunks:
    """A split's chunks from its text: one per question-answer pair when ``pairs`` is given, else the documents'."""
    desc = f"tokenising {label}"
    if pairs is not None:
        template = qa_template or qa.DEFAULT_TEMPLATE
        return qa.tokenize_question_answers(
            pairs, tokenizer, max_length, template, add_special_tokens=add_special_tokens, pad_id=pad_id, desc=desc
        )
    return tokenize_and_chunk(
        docs,
        tokenizer,
        max_length,
        min_tokens=min_tokens,
        add_special_tokens=add_special_tokens,
        pad_id=pad_id,
        desc=desc,
        first_only=first_only,
    )


def load_chunks(
    source: DocumentSource,
    tokenizer: Any,
    max_length: int,
    *,
    min_tokens: int = 5,
    add_special_tokens: bool = True,
    cache_dir: str | Path | None = None,
    qa_template: str = "",
    first_only: bool = False,
) -> Chunks:
    """The chunks of one split, from the cache when present (``cache_dir=""`` disables caching). A split with a
    question column (``source.question``) gives one chunk per question-answer pair, laid out by ``qa_template``
    (:mod:`jaxunlearn.data.qa`; ``min_tokens`` does not apply). ``first_only``: one chunk per non-empty document,
    its first ``max_length`` tokens (plain text only; ``min_tokens`` does not apply)."""
    if first_only and source.question:
        raise DataError(f"data.{source.label}: first-tokens chunks are for plain text, not question-answer data")
    pairs = _question_answers(source) if source.question else None
    docs = load_documents(source) if pairs is None else [qa_template, *(x for pair in pairs for x in pair)]
    if not (pairs if pairs is not None else docs):
        raise DataError(f"data.{source.label}: {source.describe()} has no documents")
    pad_id = pad_token_id(tokenizer)
    key = _cache_key(
        documents_fingerprint(docs),  # question-answer data: the template, then each question and answer
        tokenizer_fingerprint(tokenizer),
        max_length,
        min_tokens if pairs is None else 0,
        add_special_tokens,
        pad_id,
        first_only,
    )
    cache = None if cache_dir == "" else Path(cache_dir or locations.cache_root()) / "chunks" / f"{key}.npz"
    chunks = _read_cache(cache, key) if cache else None
    if chunks is not None:
        log.info("data.%s: %d chunks from cache %s", source.label, len(chunks), cache)
    else:
        chunks = _tokenize(
            source.label,
            docs,
            pairs,
            tokenizer,
            max_length,
            min_tokens,
            add_special_tokens,
            pad_id,
            qa_template,
            first_only,
        )
        if cache:
            _write_cache(cache, key, chunks)
    if len(chunks) == 0:
        raise DataError(
            f"data.{source.label}: {source.describe()} gave no chunk of at least {min_tokens} tokens "
            f"({len(docs)} documents)"
        )
    return chunks
