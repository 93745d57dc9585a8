"""One unlearning run, end to end: config -> data -> model -> sharded steps -> checkpoints -> HF export.

Resumable: started again with the same command and workdir, a run continues from its latest complete
checkpoint and ends with the same parameters as an uninterrupted run (the data of step ``s`` is a function of
``(seed, s)`` only, and the step's randomness is ``fold_in(seed, s)``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxunlearn import flops, hf_checkpoint, sharding
from jaxunlearn.checkpointing import Checkpointer
from jaxunlearn.config import ConfigError, validate
from jaxunlearn.data import Chunks, DataError, DocumentSource, StepBatcher, load_chunks
from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.metrics import privacy_leakage
from jaxunlearn.evaluation.report import write_report
from jaxunlearn.evaluation.suite import EvalOptions, evaluate_model, perplexities, split_stats, subset
from jaxunlearn.metrics_writer import MetricWriter
from jaxunlearn.models import LanguageModel, ModelConfig, abstract_model, param_shardings, split_model
from jaxunlearn.objectives import Context, get_method
from jaxunlearn.run_record import environment, write_json
from jaxunlearn.train import (
    batch_shardings,
    compile_train_step,
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from jaxunlearn.world import WorldRecipe, ensure_world

log = logging.getLogger("jaxunlearn")

# Settings that may change between a run and its resumption: they do not change the numbers.
RESUMABLE_CHANGES = (
    "config.mesh.",
    "config.model.remat",
    "config.model.attention_impl",
    "config.data.cache_dir",
    "config.checkpoint.",
    "config.train.log_every",
    "config.distributed",
    "config.evaluation.enabled",
    "config.evaluation.batch_size",
    "config.evaluation.max_chunks",
    "config.evaluation.mia_ks",
    "config.evaluation.reference_model",
    "config.evaluation.retrained_auc",
    "config.evaluation.verbatim_",
    "config.evaluation.task",
    "config.evaluation.pretraining_tokens",
    "config.data.approximate.",
    "config.data.general.",
)
# Bumped whenever evaluation results for the same inputs change meaning (invalidates cached evaluations).
EVAL_CACHE_VERSION = 3
# Fault injection for the resume tests: SIGKILL this process right after finishing this step.
KILL_AFTER_STEP_ENV = "JAXUNLEARN_FAULT_KILL_AFTER_STEP"


class NonFiniteError(RuntimeError):
    """The loss or gradient stopped being finite (gradient ascent is unbounded)."""


class WorkdirError(RuntimeError):
    """The workdir holds a different run."""


@dataclasses.dataclass
class Prepared:
    """Everything a run needs before its first step (also used by tests and benchmarks)."""

    config: ml_collections.ConfigDict
    mesh: Any
    model_dir: Path
    model_config: ModelConfig
    tokenizer: Any
    batcher: StepBatcher | None  # None when preparing an evaluation only
    total_steps: int
    eval_splits: dict[str, Chunks]
    world: Any = None  # the built-in world, when the config refers to it


def _flat(d: dict, prefix: str = "config") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ and that matter for the numbers."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not k.startswith(RESUMABLE_CHANGES)]


def _label_ids(tokenizer: Any, vocab_size: int) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    return np.asarray([i for i in range(min(len(tokenizer), vocab_size)) if i not in special], dtype=np.int32)


def prepare(config: ml_collections.ConfigDict, *, training: bool = True) -> Prepared:
    """Validate the config and load what is cheap: mesh, tokenizer, model config, data. Fails fast.

    ``training=False`` (evaluation only) skips the checks and data that only training needs.
    """
    validate(config)
    config, world = resolve_world(config)
    method = get_method(config.method.name)
    mesh = sharding.make_mesh(sharding.MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if training and config.train.micro_batch_size % batch_ways:
        raise ConfigError(
            f"config.train.micro_batch_size={config.train.micro_batch_size}: must be a multiple of the data x fsdp "
            f"mesh size ({batch_ways})"
        )
    m = config.model
    model_dir = hf_checkpoint.resolve_model_dir(m.path, revision=m.revision or None)
    model_config = ModelConfig.from_hf(
        hf_checkpoint.read_hf_config(model_dir),
        param_dtype=m.param_dtype,
        dtype=m.dtype,
        remat=m.remat,
        attention_impl=m.attention_impl,
    )
    param_shardings(model_config, mesh, config.mesh.rules)  # fails now if the mesh cannot split the heads
    if config.evaluation.enabled and config.evaluation.oracle_model:
        _check_oracle_architecture(config.evaluation.oracle_model, model_config)
    tokenizer = hf_checkpoint.load_tokenizer(m.tokenizer or model_dir, revision=m.revision or None)
    if len(tokenizer) > model_config.vocab_size:
        raise DataError(
            f"the tokenizer ({m.tokenizer or model_dir}) has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}: they do not belong together"
        )
    d = config.data
    splits = ["forget"] + (["retain"] if method.needs_retain and training else [])
    if config.evaluation.enabled:
        splits += [s for s in ("approximate", "general") if d[s].path]
        if d.eval_retain.path:
            splits.append("eval_retain")
        elif d.retain.path and "retain" not in splits:
            splits.append("retain")
    chunks = {}
    for split in splits:
        chunks[split] = load_chunks(
            DocumentSource.from_config(split, d[split]),
            tokenizer,
            d.max_length,
            min_tokens=d.min_chunk_tokens,
            add_special_tokens=d.add_special_tokens,
            cache_dir=d.cache_dir or None,
        )
        top = int(chunks[split].tokens.max())
        if top >= model_config.vocab_size:
            raise DataError(
                f"data.{split}: token id {top} is outside the model's vocabulary ({model_config.vocab_size})"
            )
    batcher, total = None, 0
    if training:
        batcher = StepBatcher(
            chunks["forget"],
            chunks["retain"] if method.needs_retain else None,
            config.train.micro_batch_size,
            config.train.grad_accum_steps,
            config.seed,
        )
        total = config.train.max_steps or config.train.epochs * batcher.steps_per_epoch
    # Utility is measured on `eval_retain` when given (e.g. in-distribution text for the *_general methods).
    named = {**chunks, "retain": chunks.get("eval_retain", chunks.get("retain"))}
    eval_splits = {k: named[k] for k in ("forget", "approximate", "retain", "general") if named.get(k) is not None}
    return Prepared(config, mesh, model_dir, model_config, tokenizer, batcher, total, eval_splits, world)


def resolve_world(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
    """Replace every ``world:<name>`` path by the built-in world's file, building the world if needed.

    Returns the resolved copy of the config and the world (``None`` when nothing refers to it).
    """
    unused = _unused_fields(config)
    refs = [
        (k, v)
        for k, v in _flat(config.to_dict()).items()
        if isinstance(v, str) and v.startswith("world:") and not k.startswith(unused)
    ]
    resolved = copy.deepcopy(config)
    for key in _flat(config.to_dict()):  # references in fields this run does not use are dropped, not built
        value = _get(config, key)
        if isinstance(value, str) and value.startswith("world:") and key.startswith(unused):
            _put(resolved, key, "")
    if not refs:
        return resolved, None
    world = ensure_world(WorldRecipe.from_config(config.world), config.world.cache_dir or None)
    for key, value in refs:
        try:
            _put(resolved, key, world.resolve(value))
        except KeyError as e:
            raise ConfigError(f"{key}={value!r}: {e.args[0]}") from e
    return resolved, world


def _unused_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Config keys (prefixes) a run does not read, given its method and whether it evaluates."""
    if config.evaluation.enabled:
        return ()
    unused = ["config.evaluation.", "config.data.approximate.", "config.data.general.", "config.data.eval_retain."]
    if not get_method(config.method.name).needs_retain:
        unused.append("config.data.retain.")
    return tuple(unused)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    for name in key.split(".")[1:]:
        config = config[name]
    return config


def _put(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")[1:]
    for name in parents:
        config = config[name]
    config[leaf] = value


def _abstract_state(tx: Any, model_config: ModelConfig, shardings: dict) -> Any:
    _, state = nnx.split(abstract_model(model_config), nnx.Param)
    params = state.to_pure_dict()
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def configure_logging(workdir: Path | None = None) -> None:
    """INFO from jaxunlearn to stderr (and ``<workdir>/log.txt`` once known); libraries (Orbax, absl) only warn.

    Process N > 0 of a multi-host run logs to ``log.processN.txt``.
    """
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(type(h) is logging.StreamHandler for h in log.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("jaxunlearn: %(message)s"))
        log.addHandler(console)
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if workdir is None:
        return
    # One file per process: appending to one file from several hosts interleaves their lines.
    index = jax.process_index()
    path = str(workdir / ("log.txt" if index == 0 else f"log.process{index}.txt"))
    if not any(getattr(h, "baseFilename", None) == path for h in log.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


class Run:
    """The mutable parts of one run: state, checkpoints, logs, evaluation history."""

    def __init__(self, prep: Prepared, workdir: Path):
        self.prep = prep
        self.config = prep.config
        self.workdir = workdir
        self.method = get_method(self.config.method.name)
        self.config_dict = self.config.to_dict()
        self.eval_dir = workdir / "eval"
        self.history_path = self.eval_dir / "history.jsonl"

    # --- evaluation ----------------------------------------------------------------------------------------

    def eval_options(self) -> EvalOptions:
        return EvalOptions.from_config(self.config.evaluation, self.config.data.max_length)

    def in_run_perplexities(
        self, evaluator: Evaluator, params: dict, step: int, only: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """Perplexity of every split (or of the splits ``only``) on its first ``in_run_max_chunks`` chunks.

        Entries of every split go to the history (plots); partial ones only serve the stopping rule.
        """
        limit = self.config.evaluation.in_run_max_chunks
        splits = self.prep.eval_splits if only is None else {k: self.prep.eval_splits[k] for k in only}
        entry = {"step": step, "perplexity": perplexities(split_stats(evaluator, params, splits, limit))}
        if only is not None:
            return entry
        self.eval_dir.mkdir(exist_ok=True)
        if jax.process_index() == 0:
            with open(self.history_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return entry

    def history(self, up_to: int) -> list[dict[str, Any]]:
        """Evaluation history, one entry per step (the latest wins after a resume), up to step ``up_to``."""
        by_step = {}
        if self.history_path.exists():
            for line in self.history_path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    by_step[entry["step"]] = entry
        return sharding.from_process0([by_step[s] for s in sorted(by_step) if s <= up_to])

    def cached(self, name: str, model_path: str | None, compute) -> Any:
        """``compute()``'s JSON result, cached under a key of the model, the evaluation options and the data.

        Results about fixed models (``model_path`` given: the original, the oracle) of the built-in world are
        cached in the world directory and shared by every run on it; everything else in ``<workdir>/eval``.
        """
        data = self.prep.config.to_dict()["data"]
        key = json.dumps(
            [EVAL_CACHE_VERSION, name, model_path, dataclasses.asdict(self.eval_options()), data],
            sort_keys=True,
            default=str,
        )
        directory = self.eval_dir
        if model_path is not None and self.prep.world is not None:
            directory = self.prep.world.directory / "eval"
        path = directory / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        cached = json.loads(path.read_text()) if path.exists() else {}
        hit = sharding.from_process0(cached.get("value") if cached.get("key") == key else None)
        if hit is not None:
            return hit
        value = compute()
        directory.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            write_json(path, {"key": key, "value": value})
        return value

    def full_evaluation(
        self, name: str, evaluator: Evaluator, params: dict, reference, model_path: str | None = None
    ) -> tuple[dict, dict]:
        """All metrics of one model and its raw membership scores (cached, see :meth:`cached`)."""

        def compute() -> dict:
            log.info("evaluating the %s model", name)
            metrics, scores = evaluate_model(
                evaluator, params, self.prep.tokenizer, self.prep.eval_splits, self.eval_options(), reference=reference
            )
            return {
                "metrics": metrics,
                "scores": {s: {a: np.asarray(v).tolist() for a, v in d.items()} for s, d in scores.items()},
            }

        value = self.cached(name, model_path, compute)
        return value["metrics"], {s: {a: np.asarray(v) for a, v in d.items()} for s, d in value["scores"].items()}


def _reference_for_mia(config: ml_collections.ConfigDict, mesh: Any) -> tuple[Evaluator, dict] | None:
    path = config.evaluation.reference_model
    if not path:
        return None
    rules = config.mesh.rules
    ref_lm, ref_params = split_model(
        hf_checkpoint.from_pretrained(path, mesh=mesh, rules=rules, dtype=config.model.dtype)
    )
    ev = config.evaluation
    evaluator = Evaluator(
        ref_lm, mesh, batch_size=ev.batch_size, chunk_size=config.train.logits_chunk_size, rules=rules
    )
    return evaluator, ref_params


def unlearn(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) unlearning and evaluate it; returns the run record also written to ``run.json``."""
    if config.get("distributed", False):
        jax.distributed.initialize()
    configure_logging()  # before prepare(): building the built-in world is reported as it happens
    prep = prepare(config)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    configure_logging(workdir)
    run = Run(prep, workdir)
    method = run.method
    mesh, model_config, batcher, total = prep.mesh, prep.model_config, prep.batcher, prep.total_steps
    ev = config.evaluation

    tx, schedule = make_optimizer(config.optim, total)
    rules = config.mesh.rules
    p_shardings = param_shardings(model_config, mesh, rules)
    s_shardings = state_shardings(tx, p_shardings, mesh)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
    latest = checkpointer.latest_step()
    latest_meta = checkpointer.read_meta(latest) if latest is not None else {}
    if latest is not None:
        diff = config_differences(latest_meta.get("config", {}), run.config_dict)
        if diff:
            raise WorkdirError(
                f"{workdir} holds a run with a different configuration ({', '.join(diff[:6])}); use another "
                "--workdir, or delete its checkpoints/ to start over"
            )
    finished = bool(latest_meta.get("finished")) or latest == total

    record = {
        "config": run.config_dict,
        "method": method.name,
        "seed": config.seed,
        "model": {
            "path": prep.config.model.path,
            "model_type": model_config.model_type,
            "num_params": model_config.num_params,
        },
        "world": (
            {"directory": str(prep.world.directory), "recipe": prep.world.manifest["recipe"]} if prep.world else None
        ),
        "dtypes": {
            "param": model_config.param_dtype,
            "compute": model_config.dtype,
            "reference": config.model.reference_dtype or model_config.param_dtype,
        },
        "data": {
            "forget_chunks": len(batcher.forget),
            "forget_tokens": batcher.forget.num_tokens,
            "retain_chunks": len(batcher.retain) if batcher.retain is not None else 0,
            "chunks_per_step": batcher.chunks_per_step,
            "steps_per_epoch": batcher.steps_per_epoch,
            "eval_chunks": {k: len(v) for k, v in prep.eval_splits.items()},
        },
        "total_steps": total,
        "environment": environment(mesh),
        "status": "running",
    }
    if jax.process_index() == 0:
        write_json(workdir / "run.json", record)

    # The original model is needed to start, for reference-model methods, and for the evaluations.
    lm = LanguageModel(nnx.graphdef(abstract_model(model_config)), model_config)
    need_original = latest is None or method.needs_reference or ev.enabled
    params = None
    if need_original:
        model = hf_checkpoint.from_pretrained(
            prep.model_dir,
            mesh=mesh,
            rules=rules,
            param_dtype=model_config.param_dtype,
            dtype=model_config.dtype,
            remat=model_config.remat,
            attention_impl=model_config.attention_impl,
        )
        lm, params = split_model(model)
        del model
    evaluator = Evaluator(lm, mesh, batch_size=ev.batch_size, chunk_size=config.train.logits_chunk_size, rules=rules)
    mia_reference = _reference_for_mia(config, mesh) if ev.enabled else None
    scores: dict[str, Any] = {}
    models: dict[str, Any] = {}
    oracle_params, distances = None, None
    if ev.enabled:
        models["original"], scores["original"] = run.full_evaluation(
            "original", evaluator, params, mia_reference, model_path=prep.config.model.path
        )
        if ev.oracle_model:
            oracle_params = _load_oracle(prep, lm)
            models["oracle"], scores["oracle"] = run.full_evaluation(
                "oracle", evaluator, oracle_params, mia_reference, model_path=prep.config.evaluation.oracle_model
            )
            # Before training: the original parameters are donated to the train state afterwards.
            distances = {
                "original": run.cached(
                    "original-oracle-distance",
                    prep.config.model.path,
                    lambda: oracle_distance(
                        evaluator,
                        oracle_params,
                        params,
                        models["original"],
                        models["oracle"],
                        prep.eval_splits,
                        ev.max_chunks,
                    ),
                )
            }
        initial = run.history(0) or [run.in_run_perplexities(evaluator, params, 0)]
    stop_target = None  # the stopping rule works only with evaluation on
    if ev.enabled and ev.stop_forget_ppl:
        stop_target = ev.stop_forget_ppl
    elif ev.enabled and ev.stop_approx_multiple:
        stop_target = ev.stop_approx_multiple * initial[0]["perplexity"]["approximate"]["ppl"]
    stop_every = ev.stop_every_steps or ev.every_steps
    stop_splits = ("forget", "approximate") if ev.stop_approx_reference == "current" else ("forget",)

    ref_params = None
    ref_shardings = None
    if method.needs_reference and not finished:
        ref_dtype = jnp.dtype(config.model.reference_dtype or model_config.param_dtype)
        ref_shardings = p_shardings
        ref_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(ref_dtype), p), out_shardings=p_shardings)(
            params
        )
    if latest is None:
        state = init_state(params, tx, s_shardings)
        start = 0
        log.info("starting %s: %d steps of %d chunks", method.name, total, batcher.chunks_per_step)
    else:
        params = None
        state, _ = checkpointer.restore(latest, _abstract_state(tx, model_config, s_shardings))
        start = int(state["step"])
        if not finished:
            log.info("resuming %s from step %d of %d (%s)", method.name, start, total, checkpointer.directory)

    ctx = Context(
        lm,
        hparams={k: v for k, v in config.method.items() if k != "name"},
        seed=config.seed,
        label_ids=_label_ids(prep.tokenizer, model_config.vocab_size) if method.name == "random_label" else None,
        chunk_size=config.train.logits_chunk_size,
    )
    writer = MetricWriter(workdir)
    stopped = latest_meta.get("stopped")
    end = start
    timed_tokens, timed_seconds = 0, 0.0
    last_metrics: dict[str, float] = dict(latest_meta.get("last_metrics", {}))  # kept by a rerun of a finished run
    if not finished:
        first = batcher.batch(start)
        b_shardings = batch_shardings(first, mesh, rules)
        step_fn = compile_train_step(
            make_train_step(method, ctx, tx, schedule), s_shardings, ref_shardings, b_shardings, mesh
        )
        stop = {"signal": None}

        def request_stop(signum, _frame):
            stop["signal"] = signum

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "-1"))
        every = config.checkpoint.every_steps

        def meta(step: int, done_now: bool) -> dict[str, Any]:
            return {
                "step": step,
                "total_steps": total,
                "forget_chunks_seen": step * batcher.chunks_per_step,
                "epoch": step / batcher.steps_per_epoch,
                "finished": done_now,
                "stopped": stopped,
                "last_metrics": {k: float(v) for k, v in last_metrics.items()},
                "config": run.config_dict,
            }

        try:
            with (
                sharding.activation_sharding(mesh, rules),
                tqdm(total=total, initial=start, desc=f"unlearning ({method.name})", unit="step", disable=None) as bar,
            ):
                for step in range(start, total):
                    host_batch = batcher.batch(step)
                    tokens = sum(int(s["mask"].sum()) for s in host_batch.values())
                    t0 = time.perf_counter()
                    state, metrics = step_fn(state, ref_params, sharding.host_to_global(host_batch, b_shardings))
                    metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
                    seconds = time.perf_counter() - t0
                    if step > start:  # the first step includes compilation
                        timed_tokens, timed_seconds = timed_tokens + tokens, timed_seconds + seconds
                    if not metrics.pop("finite"):
                        checkpointer.wait()
                        good = checkpointer.latest_step()
                        raise NonFiniteError(
                            f"step {step + 1}: the loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) "
                            f"is not finite; stopped without applying it. The last good checkpoint "
                            f"({'step ' + str(good) if good is not None else 'none yet'}) in {checkpointer.directory} "
                            "is intact. Lower config.optim.lr or the number of steps."
                        )
                    metrics["tokens_per_s"] = tokens / seconds
                    last_metrics = metrics
                    done = end = step + 1
                    if done % config.train.log_every == 0 or done == total:
                        writer.write(done, metrics)
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k != "grad_norm"}, refresh=False)
                    full_eval = ev.every_steps and done % ev.every_steps == 0
                    stop_check = stop_target is not None and stop_every and done % stop_every == 0
                    if ev.enabled and (full_eval or stop_check) and done < total:
                        entry = run.in_run_perplexities(
                            evaluator, state["params"], done, only=None if full_eval else stop_splits
                        )
                        writer.write(
                            done, {f"{k}_ppl": v["ppl"] for k, v in entry["perplexity"].items()}, prefix="eval"
                        )
                        forget_ppl = entry["perplexity"]["forget"]["ppl"]
                        if ev.stop_approx_multiple and ev.stop_approx_reference == "current":
                            stop_target = ev.stop_approx_multiple * entry["perplexity"]["approximate"]["ppl"]
                        if stop_target is not None and forget_ppl >= stop_target:
                            stopped = {"step": done, "forget_ppl": forget_ppl, "target": stop_target}
                            log.info(
                                "stopping rule met at step %d: forget perplexity %.4g >= %.4g",
                                done,
                                forget_ppl,
                                stop_target,
                            )
                    finishing = done == total or stopped is not None
                    if finishing or (every and done % every == 0) or stop["signal"] is not None:
                        checkpointer.save(done, state, meta(done, finishing))
                    if done == kill_after:
                        checkpointer.wait()
                        os.kill(os.getpid(), signal.SIGKILL)
                    if finishing:
                        break
                    if stop["signal"] is not None:
                        checkpointer.wait()
                        raise KeyboardInterrupt(
                            f"stopped by signal {stop['signal']} after step {done}; rerun to resume"
                        )
            checkpointer.wait()
        finally:
            writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
    else:
        writer.close()
        log.info("%s already finished at step %d", workdir, start)
    end = max(end, start)
    final_params = state["params"]

    export_dir = None
    if config.checkpoint.export:
        export_dir = workdir / "hf_model"
        if not sharding.from_process0((export_dir / "config.json").exists()) or not finished:
            hf_checkpoint.save_pretrained(
                lm.bind(final_params),
                export_dir,
                tokenizer=prep.tokenizer,
                dtype=config.checkpoint.export_dtype or None,
            )
    checkpointer.close()

    report = None
    if ev.enabled:
        history = run.history(end)
        if not history or history[-1]["step"] != end:
            history.append(run.in_run_perplexities(evaluator, final_params, end))
        models["unlearned"], scores["unlearned"] = run.full_evaluation(
            "unlearned", evaluator, final_params, mia_reference
        )
        if oracle_params is not None:
            _add_privleak(models, ev.retrained_auc or models["oracle"]["mia"]["min_k_0.4"]["auc"])
            distances["unlearned"] = oracle_distance(
                evaluator,
                oracle_params,
                final_params,
                models["unlearned"],
                models["oracle"],
                prep.eval_splits,
                ev.max_chunks,
            )
        report = write_report(
            workdir,
            stamp=_stamp(record, end, stopped),
            models=models,
            scores=scores,
            history=history,
            compute=compute_summary(config, prep, method, end),
            oracle_distance=distances,
            stop_target=stop_target,
        )
    record.update(
        status="completed",
        steps=end,
        stopped=stopped,
        final_metrics=last_metrics,
        tokens_per_s=(timed_tokens / timed_seconds) if timed_seconds else None,
        hf_model=str(export_dir) if export_dir else None,
        report=str(workdir / "report.md") if report else None,
    )
    if jax.process_index() == 0:
        write_json(workdir / "run.json", record)
    log.info("done: %s", export_dir or workdir)
    return record


def _check_oracle_architecture(path: str, model_config: ModelConfig) -> None:
    """Before any compute: KL(oracle || model) needs the oracle to share the model's architecture."""
    oracle = hf_checkpoint.load_config(
        path,
        param_dtype=model_config.param_dtype,
        dtype=model_config.dtype,
        remat=model_config.remat,
        attention_impl=model_config.attention_impl,
    )
    if oracle.replace(hf_config_json="") != model_config.replace(hf_config_json=""):
        raise ConfigError(f"config.evaluation.oracle_model={path!r}: its architecture differs from config.model.path's")


def _load_oracle(prep: Prepared, lm: LanguageModel) -> dict:
    """The oracle's parameters (its architecture was checked against the model's by :func:`prepare`)."""
    c = prep.config
    _, oracle_params = split_model(
        hf_checkpoint.from_pretrained(
            c.evaluation.oracle_model,
            mesh=prep.mesh,
            rules=c.mesh.rules,
            param_dtype=lm.config.param_dtype,
            dtype=lm.config.dtype,
            remat=lm.config.remat,
            attention_impl=lm.config.attention_impl,
        )
    )
    return oracle_params


def _add_privleak(models: dict[str, Any], retrained_auc: float) -> None:
    """MUSE's PrivLeak of every model relative to the retrained model's Min-K% (k=0.4) AUC."""
    for metrics in models.values():
        mia = metrics.get("mia")
        if mia and "min_k_0.4" in mia:
            mia["privleak"] = {"min_k_0.4": privacy_leakage(mia["min_k_0.4"]["auc"], retrained_auc)}


def oracle_distance(
    evaluator: Evaluator,
    oracle_params: dict,
    params: dict,
    metrics: dict[str, Any],
    oracle: dict[str, Any],
    splits: dict[str, Chunks],
    limit: int,
) -> dict[str, float]:
    """How far a model is from the exact retrain: forget-perplexity ratio, membership-AUC difference, and the
    mean ``KL(oracle || model)`` per token on forget and on retain chunks."""
    out = {
        "forget_ppl_ratio": metrics["perplexity"]["forget"]["ppl"] / oracle["perplexity"]["forget"]["ppl"],
        "min_k_0.4_auc_diff": metrics["mia"]["min_k_0.4"]["auc"] - oracle["mia"]["min_k_0.4"]["auc"],
        "loss_auc_diff": metrics["mia"]["loss"]["auc"] - oracle["mia"]["loss"]["auc"],
    }
    for split in ("forget", "retain"):
        if split in splits:
            idx = subset(len(splits[split]), limit)
            kl = evaluator.sequence_kl(oracle_params, params, splits[split].tokens[idx], splits[split].mask[idx])
            out[f"kl_{split}"] = float(np.mean(kl))
    return out


def _stamp(record: dict[str, Any], steps: int, stopped: Any) -> dict[str, Any]:
    env = record["environment"]
    return {
        "title": f"{record['method']} on {record['model']['path']}",
        "model": record["model"],
        "method": record["method"],
        "seed": record["seed"],
        "mesh": env.get("mesh", {}).get("shape"),
        "dtypes": record["dtypes"],
        "steps": steps,
        "stopped": stopped,
        "versions": env["versions"],
        "device": f"{env['device_count']} x {env['device_kind']}",
    }


def compute_summary(config: ml_collections.ConfigDict, prep: Prepared, method: Any, steps: int) -> dict[str, Any]:
    """Unlearning FLOPs against pre-training the model from scratch (the paper's efficiency claim)."""
    reference_forwards = int(method.needs_reference)
    step = flops.unlearning_step_flops(
        prep.model_config,
        config.data.max_length,
        prep.batcher.chunks_per_step,
        retain=method.needs_retain,
        reference_forwards=reference_forwards,
    )
    unlearning = step * steps
    pretrain_tokens = float(config.evaluation.pretraining_tokens)
    pretraining = flops.pretraining_flops(prep.model_config, pretrain_tokens, config.data.max_length)
    return {
        "model_params": prep.model_config.num_params,
        "unlearning_steps": steps,
        "unlearning_flops": unlearning,
        "pretraining_tokens": pretrain_tokens,
        "pretraining_flops": pretraining,
        "retraining_over_unlearning": pretraining / unlearning if unlearning else None,
        "note": "model FLOPs (6N per trained token + attention, 2N per reference-model token); evaluation excluded",
    }
