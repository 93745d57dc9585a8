"""Build (once) and cache the built-in world: data splits, tokenizer, target model and exact-retrain oracle.

The *target* is pre-trained on ``forget`` (repeated ``forget_repeats`` times per pass, so that membership is
measurable) + ``retain`` + ``general_retain``; the *oracle* with the identical recipe and seed on the same
documents minus ``forget``. The tokenizer is a byte-level BPE trained on the oracle's documents only, so no
part of the oracle ever saw a forget document. Both models are saved in Hugging Face format with a manifest
(recipe, per-split content hashes and document ids, sizes, training statistics, versions, and a SHA-256 of
every file).

Worlds live in ``<cache>/worlds/<name>-<key>``, where the key hashes the recipe and the corpus content: a
changed recipe or a different Python standard library gives a new world; an entry whose files no longer match
their hashes is rebuilt, never used. The cache root is ``$JAXUNLEARN_CACHE`` (default ``~/.cache/jaxunlearn``)
or ``world.cache_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import filelock
import numpy as np

import jaxunlearn.world.pretrain as pretraining
from jaxunlearn import __version__
from jaxunlearn.common.versions import library_versions
from jaxunlearn.data.arrays import Chunks
from jaxunlearn.data.chunks import tokenize_and_chunk
from jaxunlearn.data.documents import documents_fingerprint
from jaxunlearn.errors import AT_LEAST_1, NON_NEGATIVE, POSITIVE, check_rules, require
from jaxunlearn.models import ModelConfig
from jaxunlearn.models.hf_checkpoint import save_pretrained
from jaxunlearn.parallel import sharding
from jaxunlearn.storage import locations
from jaxunlearn.world.corpus import SPLITS, split_documents

log = logging.getLogger("jaxunlearn.world")

FORMAT_VERSION = 1
EOS = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class WorldRecipe:
    """Everything that determines a world (the ``world`` config section minus ``use``/``cache_dir``)."""

    name: str = "stdlib"
    seed: int = 0
    # corpus
    forget_docs: int = 40
    approximate_docs: int = 40
    band_min_chars: int = 2000
    band_max_chars: int = 8000
    retain_chars: int = 1_000_000
    retain_max_chars: int = 32_000
    general_eval_fraction: float = 0.33
    # tokenizer and model
    vocab_size: int = 2048
    max_length: int = 128
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    # pre-training
    steps: int = 250
    batch_size: int = 32
    lr: float = 3e-3
    forget_repeats: int = 4

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> WorldRecipe:
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})

    def model_config(self, vocab_size: int, special_ids: Mapping[str, int]):

        hf = {
            "bos_token_id": special_ids["eos"],
            "eos_token_id": special_ids["eos"],
            "pad_token_id": special_ids["eos"],
        }
        return ModelConfig(
            model_type="llama",
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads,
            rms_norm_eps=1e-5,
            max_position_embeddings=max(self.max_length, 512),
            tie_word_embeddings=True,
            dtype="float32",
            hf_config_json=json.dumps(hf),
        )


# A tiny world (a 20k-parameter model, 3 forget documents; built in seconds on a CPU), for checking that things
# run, not for results: the tests' world and the quickstart notebook's "ci" size. ``WorldRecipe(**SMALL_RECIPE)``,
# or ``--config.world.KEY=VALUE`` for each item.
SMALL_RECIPE = dict(
    forget_docs=3,
    approximate_docs=3,
    band_min_chars=1000,
    band_max_chars=6000,
    retain_chars=30_000,
    retain_max_chars=8000,
    vocab_size=300,
    max_length=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    steps=6,
    batch_size=8,
    lr=3e-3,
    forget_repeats=2,
)


@dataclasses.dataclass(frozen=True)
class World:
    directory: Path
    manifest: dict[str, Any]

    @property
    def target(self) -> Path:
        return self.directory / "target"

    @property
    def oracle(self) -> Path:
        return self.directory / "oracle"

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer"

    def data(self, split: str) -> Path:
        if split not in SPLITS:
            raise KeyError(f"unknown world split {split!r}; splits: {', '.join(SPLITS)}")
        return self.directory / "data" / f"{split}.jsonl"

    def resolve(self, reference: str) -> str:
        """``world:target``/``world:oracle``/``world:<split>[+<split>...]`` -> path(s) in this world (several
        splits become a comma-separated list of files)."""
        what = reference.removeprefix("world:")
        if what in ("target", "oracle", "tokenizer"):
            return str(getattr(self, what))
        return ",".join(str(self.data(split)) for split in what.split("+"))


def world_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else locations.cache_root()


def _corpus(recipe: WorldRecipe) -> dict[str, list[tuple[str, str]]]:
    return split_documents(
        seed=recipe.seed,
        forget_docs=recipe.forget_docs,
        approximate_docs=recipe.approximate_docs,
        band_chars=(recipe.band_min_chars, recipe.band_max_chars),
        retain_chars=recipe.retain_chars,
        retain_max_chars=recipe.retain_max_chars,
        general_eval_fraction=recipe.general_eval_fraction,
    )


def world_key(recipe: WorldRecipe, corpus: Mapping[str, list[tuple[str, str]]]) -> str:

    payload = {
        "format": FORMAT_VERSION,
        "jaxunlearn": __version__,
        "recipe": dataclasses.asdict(recipe),
        "corpus": {s: documents_fingerprint([t for _, t in docs]) for s, docs in corpus.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(directory: Path) -> dict[str, Any] | None:
    """The manifest if every file it lists exists with its recorded hash, else ``None``."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        for rel, digest in manifest["files"].items():
            if _sha256(directory / rel) != digest:
                log.warning("built-in world %s: %s does not match its hash", directory, rel)
                return None
        return manifest
    except (OSError, KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:  # damaged: rebuild it
        log.warning("built-in world %s is incomplete or unreadable (%s)", directory, e)
        return None


def _remove_stale_builds(directory: Path) -> None:
    """Remove temporary build directories of ``directory`` left by builds that were killed (their process is
    gone). Called under the cache lock, so no live build of this world can be running elsewhere on this host."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def ensure_world(recipe: WorldRecipe, cache_dir: str | os.PathLike | None = None, *, mesh: Any = None) -> World:
    """The world for ``recipe``: from the cache when present and intact, else built now (minutes on a CPU)."""
    corpus = _corpus(recipe)
    import jax

    if mesh is None and jax.process_count() > 1:
        # Each host builds (or waits for) the world on its own devices: no collective across hosts while
        # another host may be blocked on the cache lock.
        mesh = sharding.make_mesh(devices=jax.local_devices())
    root = world_cache_root(cache_dir) / "worlds"
    directory = root / f"{recipe.name}-{world_key(recipe, corpus)}"
    root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(root / f".{directory.name}.lock"):
        _remove_stale_builds(directory)
        if directory.exists():
            manifest = verify(directory)
            if manifest is not None:
                return World(directory, manifest)
            log.warning("rebuilding the corrupted built-in world %s", directory)
            shutil.rmtree(directory)
        log.info("building the built-in world %s (first run only; a few minutes on a CPU)", directory)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            manifest = _build(recipe, corpus, tmp, mesh)
            tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return World(directory, manifest)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (``tokenizers``) wrapped as a transformers fast tokenizer, with one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def _concat(parts: list[Chunks]) -> Chunks:
    return Chunks(
        np.concatenate([p.tokens for p in parts]),
        np.concatenate([p.lengths for p in parts]),
        np.concatenate([p.doc_index for p in parts]),
        sum(p.num_documents for p in parts),
    )


def _build(recipe: WorldRecipe, corpus: Mapping[str, list[tuple[str, str]]], out: Path, mesh: Any) -> dict[str, Any]:
    """Data, tokenizer, the target and the oracle into ``out``; returns the manifest (also written there)."""
    t0 = time.perf_counter()
    _write_data(corpus, out / "data")
    oracle_docs = corpus["retain"] + corpus["general_retain"]
    tokenizer = train_tokenizer([t for _, t in oracle_docs], recipe.vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    chunks = {
        split: tokenize_and_chunk(
            [t for _, t in docs],
            tokenizer,
            recipe.max_length,
            add_special_tokens=False,
            pad_id=tokenizer.pad_token_id,
            desc=f"tokenising {split}",
        )
        for split, docs in corpus.items()
    }
    vocab = -(-len(tokenizer) // 64) * 64  # padded to a multiple of 64, as checkpoints usually are
    model_config = recipe.model_config(vocab, {"eos": tokenizer.eos_token_id})
    stats = _pretrain_models(recipe, model_config, chunks, tokenizer, out, mesh)
    manifest = _manifest(recipe, corpus, chunks, stats, out)
    manifest["model"] = {"num_params": model_config.num_params, "vocab_size": vocab, "tokenizer_size": len(tokenizer)}
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    manifest["files"] = {
        str(p.relative_to(out)): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_data(corpus: Mapping[str, list[tuple[str, str]]], directory: Path) -> None:
    directory.mkdir(parents=True)
    for split, docs in corpus.items():
        with open(directory / f"{split}.jsonl", "w") as f:
            for doc_id, text in docs:
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")


def _pretrain_models(
    recipe: WorldRecipe, model_config: Any, chunks: Mapping[str, Chunks], tokenizer: Any, out: Path, mesh: Any
) -> dict[str, dict[str, float]]:
    """Pre-train the target (forget repeated) and the oracle (no forget) with one recipe; save both."""

    training = {
        "target": _concat([chunks["forget"]] * recipe.forget_repeats + [chunks["retain"], chunks["general_retain"]]),
        "oracle": _concat([chunks["retain"], chunks["general_retain"]]),
    }
    stats = {}
    for name, data in training.items():
        model, stats[name] = pretraining.pretrain(
            model_config,
            data,
            steps=recipe.steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            seed=recipe.seed,
            mesh=mesh,
            desc=f"pre-training the {name}",
        )
        save_pretrained(model, out / name, tokenizer=tokenizer)
        s = stats[name]
        log.info(
            "%s: loss %.3f after %d steps (%.0f s, %.0f tokens/s)",
            name,
            s["final_loss"],
            recipe.steps,
            s["seconds"],
            s["tokens_per_s"],
        )
    return stats


def _manifest(
    recipe: WorldRecipe,
    corpus: Mapping[str, list[tuple[str, str]]],
    chunks: Mapping[str, Chunks],
    stats: dict[str, Any],
    out: Path,
) -> dict[str, Any]:

    return {
        "format": FORMAT_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "splits": {
            split: {
                "documents": len(docs),
                "characters": sum(len(t) for _, t in docs),
                "tokens": chunks[split].num_tokens,
                "chunks": len(chunks[split]),
                "content_sha256": documents_fingerprint([t for _, t in docs]),
                "ids": [doc_id for doc_id, _ in docs],
            }
            for split, docs in corpus.items()
        },
        "training_documents": {
            "target": {"forget": recipe.forget_repeats, "retain": 1, "general_retain": 1},
            "oracle": {"retain": 1, "general_retain": 1},
        },
        "pretraining": stats,
        "versions": library_versions(),
    }


WORLD_POSITIVE = (
    "forget_docs",
    "approximate_docs",
    "band_min_chars",
    "retain_chars",
    "vocab_size",
    "max_length",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "steps",
    "batch_size",
    "forget_repeats",
)


def check_config(w: Any) -> None:
    """The ``world`` section: the built-in world's recipe."""
    rules = {
        "general_eval_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
        "lr": POSITIVE,
        "seed": (NON_NEGATIVE[0], ">= 0 (a NumPy seed)"),
        **{k: AT_LEAST_1 for k in WORLD_POSITIVE},
    }
    check_rules(w, "config.world", rules)
    require(w.band_max_chars >= w.band_min_chars, "config.world.band_max_chars", w.band_max_chars, ">= band_min_chars")
    require(w.hidden_size % w.num_heads == 0, "config.world.num_heads", w.num_heads, "must divide hidden_size")
    require(
        w.num_heads % w.num_kv_heads == 0,
        "config.world.num_kv_heads",
        w.num_kv_heads,
        f"must divide num_heads ({w.num_heads}): each key-value head serves a whole group of query heads",
    )
