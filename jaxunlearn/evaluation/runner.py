"""The evaluations of one run: every model's registered metrics (cached), and the perplexity history.

Cached results are JSON files holding the key they answer and a SHA-256 of their value: a truncated or edited
file is reported and recomputed, never trusted or fatal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxunlearn.data.arrays import Chunks
from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.registry import EvalContext, Metric, Oracle, evaluate_model, get_metric, split_stats
from jaxunlearn.evaluation.settings import metric_options
from jaxunlearn.models import LanguageModel, hf_checkpoint
from jaxunlearn.parallel import sharding
from jaxunlearn.storage import locations
from jaxunlearn.storage.files import write_json

log = logging.getLogger("jaxunlearn")

# Bumped when the cache file layout or the meaning of a cached evaluation changes for every metric at once
# (a single metric bumps its own ``version``).
CACHE_FORMAT = 4


def selected_metrics(evaluation: ml_collections.ConfigDict) -> list[tuple[Metric, dict[str, Any]]]:
    """The metrics ``config.evaluation.metrics`` lists, in order, with their options as plain values."""
    metrics = [get_metric(name) for name in evaluation.metrics]
    return [(m, metric_options(evaluation, m.name) if m.options else {}) for m in metrics]


def perplexities(evaluator: Evaluator, params: dict, splits: Mapping[str, Chunks], limit: int) -> dict[str, dict]:
    """Perplexity of every split on its first ``limit`` evenly spaced chunks (in-run history, stopping rule)."""
    return {
        name: M.perplexity_metrics(split_stats(evaluator, params, c, limit, name, moments=False))
        for name, c in splits.items()
    }


@dataclasses.dataclass
class ResultCache:
    """JSON results in ``directory``, one file per key, verified on read."""

    directory: Path

    def path(self, name: str, key: str) -> Path:
        return self.directory / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def read(self, name: str, key: str) -> Any:
        path = self.path(name, key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            value = entry["value"]
            if entry["key"] != key or entry["sha256"] != _digest(value):
                raise ValueError("its content does not match its checksum")
            return value
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: '[' * 200000
            log.warning("ignoring the damaged cached evaluation %s (%s); recomputing it", path, e)
            return None

    def write(self, name: str, key: str, value: Any) -> None:
        """Cache a result, or warn in one line when it cannot be (a directory in the way, a read-only or full
        disk): the cache only saves time, and the result is still reported."""
        path = self.path(name, key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json(path, {"key": key, "value": value, "sha256": _digest(value)})
        except OSError as e:
            log.warning("cannot cache the evaluation in %s (%s); continuing without it", path, e)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def evaluated_data(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """The data settings an evaluation depends on: all but the training retain split when utility is measured on
    ``eval_retain`` (so that methods retaining on other text share the original model's evaluation)."""
    settings = data.to_dict()
    if settings.get("eval_retain", {}).get("path"):
        settings.pop("retain", None)
    return settings


def chunks_hash(chunks: Chunks) -> str:
    """A hash of the token ids, lengths and prompt lengths of a split's chunks."""
    h = hashlib.sha256()
    for array in (chunks.tokens, chunks.lengths, chunks.prompt_lengths):
        if array is not None:
            h.update(str(array.shape).encode())
            h.update(array.tobytes())
    return h.hexdigest()


def checkpoint_stamp(path: str) -> list[list[Any]] | None:
    """``[[file, size, mtime_ns], ...]`` of a local checkpoint (a directory or a GGUF file), ``None`` when it is
    not on this machine: an evaluation of the model read from there stays valid while these do."""
    try:
        location = hf_checkpoint.resolve_model_dir(path)
        files = [location] if location.is_file() else sorted(p for p in location.rglob("*") if p.is_file())
        return [[p.name if location.is_file() else str(p.relative_to(location)), *_stamp(p)] for p in files]
    except (OSError, ValueError):  # unreadable or not local: never shared
        return None


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def shared_eval_directory(config: ml_collections.ConfigDict) -> Path | None:
    """Where evaluations of checkpoints are shared between runs: ``<data.cache_dir>/eval`` (default cache)."""

    cache = config.data.get("cache_dir", "")
    if cache and locations.is_url(cache):
        return None  # a remote cache is synced around data loading only
    return (Path(cache).expanduser() if cache else locations.cache_root()) / "eval"


class RunEvaluations:
    """Metrics of the models of one run (original, oracle, unlearned) and its in-run perplexity history.

    Results about models read from a checkpoint (the original and the oracle) are shared by every run that
    evaluates them on the same data: in the built-in world's directory for its models, else in
    ``shared_directory`` (``<cache>/eval``), keyed by the checkpoint files' sizes and modification times; the
    unlearned model's in ``<workdir>/eval``. Every key holds a hash of the evaluated chunks, so a split whose
    documents changed (e.g. source code read with ``python:modules:``) is evaluated again.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        evaluator: Evaluator,
        tokenizer: Any,
        splits: Mapping[str, Chunks],
        workdir: Path,
        *,
        load_model: Callable[[str], tuple[Evaluator, dict]],
        world_directory: Path | None = None,
        shared_directory: Path | None = None,
        stop_ids: tuple[int, ...] = (),
    ):
        self.config = config
        self.stop_ids = stop_ids  # the model's generation-config EOS ids (generation stops at them)
        self.evaluator = evaluator
        self.tokenizer = tokenizer
        self.splits = splits
        self.eval_dir = workdir / "eval"
        self.history_path = self.eval_dir / "history.jsonl"
        self.world_directory = world_directory
        shared = world_directory / "eval" if world_directory else shared_directory
        self.checkpoint_cache = ResultCache(shared) if shared else None
        self.run_cache = ResultCache(self.eval_dir)
        self.chunk_hashes = {name: chunks_hash(c) for name, c in splits.items()}
        self.metrics = selected_metrics(config.evaluation)
        self._load_model = load_model
        self._loaded: dict[str, tuple[Evaluator, dict]] = {}
        self.oracle: Oracle | None = None

    @classmethod
    def for_run(cls, prep: Any, lm: LanguageModel, workdir: Path) -> RunEvaluations:
        """The evaluations of a prepared run (:class:`~jaxunlearn.run.prepare.Prepared`) whose model is ``lm``, in
        ``evaluation.dtype`` when set (else the model's compute dtype), on the run's mesh."""
        config, ev = prep.config, prep.config.evaluation
        if ev.dtype and ev.dtype != lm.config.dtype:
            lm = lm.with_dtype(ev.dtype)

        def evaluator(model: LanguageModel) -> Evaluator:
            return Evaluator.for_run(model, prep.mesh, config)

        def load_other(path: str) -> tuple[Evaluator, dict]:
            other, params = hf_checkpoint.load_model(
                path, config.model, mesh=prep.mesh, rules=config.mesh.rules, dtype=lm.config.dtype
            )
            return evaluator(other), params

        world = prep.world.directory if prep.world is not None else None
        return cls(
            config,
            evaluator(lm),
            prep.tokenizer,
            prep.eval_splits,
            workdir,
            load_model=load_other,
            world_directory=world,
            shared_directory=shared_eval_directory(config),
            stop_ids=hf_checkpoint.stop_token_ids(prep.model_dir),
        )

    def load_model(self, path: str) -> tuple[Evaluator, dict]:
        """Another checkpoint (e.g. the reference-attack model) on the run's mesh, loaded once per run."""
        if path not in self._loaded:
            self._loaded[path] = self._load_model(path)
        return self._loaded[path]

    def _key(self, name: str, model_path: str | None) -> str:
        ev = self.config.evaluation
        return json.dumps(
            {
                "format": CACHE_FORMAT,
                "model": name,
                "path": model_path,
                "metrics": [[m.name, m.version, options] for m, options in self.metrics],
                "max_chunks": ev.max_chunks,
                "stop_ids": list(self.stop_ids),
                "dtype": self.evaluator.lm.config.dtype,
                "oracle": ev.oracle_model if self.oracle is not None and name != "oracle" else None,
                "data": evaluated_data(self.config.data),
                "chunks": self.chunk_hashes,
                "checkpoint": checkpoint_stamp(model_path) if model_path and not self.world_directory else None,
            },
            sort_keys=True,
            default=str,
        )

    def evaluate(self, name: str, params: dict, model_path: str | None = None, *, cache: bool = True) -> dict[str, Any]:
        """Every selected metric of one model, from the cache when this exact evaluation was done before
        (``cache=False``: always computed, never stored)."""
        store = (
            self.checkpoint_cache if model_path is not None and self.checkpoint_cache is not None else self.run_cache
        )
        key = self._key(name, model_path)
        hit = sharding.from_process0(store.read(name, key) if cache else None)
        if hit is not None:
            return hit
        log.info("evaluating the %s model", name)
        ctx = EvalContext(
            self.evaluator,
            params,
            self.tokenizer,
            self.splits,
            self.config.evaluation.max_chunks,
            self.config.data.max_length,
            name,
            oracle=self.oracle if name != "oracle" else None,
            load_model=self.load_model,
            stop_ids=self.stop_ids,
        )
        value = evaluate_model(ctx, self.metrics)
        if cache and jax.process_index() == 0:
            store.write(name, key, value)
        return value

    def finalize(self, results: dict[str, dict[str, Any]]) -> None:
        """Cross-model values (e.g. PrivLeak against the oracle), once every model is evaluated."""
        for metric, options in self.metrics:
            if metric.finalize is not None:
                metric.finalize(results, options)

    # --- in-run perplexity history --------------------------------------------------------------------------

    def in_run(self, params: dict, step: int, only: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Perplexity of every split (or of the splits ``only``) on its first ``in_run_max_chunks`` chunks.

        Entries of every split go to the history (plots); partial ones only serve the stopping rule.
        """
        splits = self.splits if only is None else {k: self.splits[k] for k in only}
        entry = {"step": step, "perplexity": perplexities(self.evaluator, params, splits, self.in_run_chunks)}
        if only is None:
            self.record(entry)
        return entry

    @property
    def in_run_chunks(self) -> int:
        return self.config.evaluation.in_run_max_chunks

    def record(self, entry: dict[str, Any]) -> None:
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            with open(self.history_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def history(self, up_to: int) -> list[dict[str, Any]]:
        """Evaluation history, one entry per step (the latest wins after a resume), up to step ``up_to``."""
        by_step = {}
        if jax.process_index() == 0 and self.history_path.exists():
            for line in self.history_path.read_text().splitlines():
                try:
                    entry = json.loads(line) if line.strip() else None
                except (json.JSONDecodeError, RecursionError):  # a line cut short by a kill: evaluated again
                    entry = None
                if isinstance(entry, dict) and "step" in entry:
                    by_step[entry["step"]] = entry
        return sharding.from_process0([by_step[s] for s in sorted(by_step) if s <= up_to])
