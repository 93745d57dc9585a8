"""One unlearning run, end to end, as phases that read top to bottom (:func:`unlearn`):

prepare (config, world, data) -> claim the workdir and resume point -> load models -> evaluate the original
(and the oracle) -> train (a step loop with hooks) -> export -> evaluate the unlearned model -> report.

Resumable: started again with the same command and workdir, a run continues from its latest complete
checkpoint and ends with the same parameters as an uninterrupted run (the data of step ``s`` is a function of
``(seed, s)`` only, and the step's randomness is ``fold_in(seed, s)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx
from tqdm.auto import tqdm

from jaxunlearn.common import interrupts
from jaxunlearn.config import validate
from jaxunlearn.evaluation.in_run import StoppingRule, perplexity_hook
from jaxunlearn.evaluation.registry import Oracle
from jaxunlearn.evaluation.report import write_report
from jaxunlearn.evaluation.runner import RunEvaluations
from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import get_method, method_hparams
from jaxunlearn.models import LanguageModel, abstract_model, hf_checkpoint, lora, param_shardings
from jaxunlearn.parallel import sharding
from jaxunlearn.run import logs
from jaxunlearn.run.metrics_writer import MetricWriter
from jaxunlearn.run.prepare import Prepared, prepare
from jaxunlearn.run.record import compute_summary, run_record, stamp
from jaxunlearn.run.workdir import ADAPTER_EXPORT, EXPORT, Workdir, WorkdirError, config_differences
from jaxunlearn.storage.checkpoints import Checkpointer
from jaxunlearn.training import hooks
from jaxunlearn.training.loop import LoopResult, NonFiniteError, Trainer
from jaxunlearn.training.step import StepSetup, all_finite, init_state, lora_spec, reference_dtype

__all__ = ["NonFiniteError", "Prepared", "WorkdirError", "prepare", "unlearn"]

log = logging.getLogger("jaxunlearn")


def unlearn(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, force_workdir: bool = False
) -> dict[str, Any]:
    """Run (or resume) unlearning and evaluate it; returns the run record also written to ``run.json``.
    ``force_workdir`` lets the run share an existing directory that holds other files (none of them is replaced)."""
    if config.get("distributed", False):
        sharding.initialize_distributed()
        interrupts.rearm()  # jax.distributed takes SIGTERM for its preemption notifier
    logs.configure_logging()  # before prepare(): building the built-in world is reported as it happens
    validate(config)
    with Workdir(workdir, force=force_workdir).claimed() as wd:
        interrupts.fault_point("prepare")  # tests: a signal before run.json exists
        prep = prepare(config)
        resume = open_checkpoints(prep, wd)
        wd.accept(run_record(prep))
        interrupts.fault_point("load")
        models = load_models(prep, resume)
        evals = make_evaluations(prep, wd, models)
        before = evaluate_before(prep, evals, models)
        method, derived = resolve_method(prep.config.method, before)
        rule = StoppingRule.from_config(prep.config.evaluation, before["history"][0]) if evals else None
        interrupts.check()  # a signal swallowed on the way (a library's bare except) stops the run here
        trained = train(prep, wd, resume, models, evals, rule, method)
        params = models.unlearned(trained.state["params"])
        interrupts.fault_point("export")
        export_dir = export(prep, wd, models.lm, params, resume)
        adapter_dir = export_adapter(prep, wd, models.lm, trained.state["params"])
        resume.checkpointer.close()
        report = evaluate_after(prep, wd, evals, before, trained, rule, params)
        log.info("done: %s", export_dir or wd.path)
        interrupts.check()  # never "completed" after a signal
        return wd.finish(
            "completed",
            steps=trained.steps,
            stopped=trained.stopped,
            final_metrics=trained.last_metrics,
            tokens_per_s=trained.tokens_per_s,
            hf_model=wd.location(EXPORT) if export_dir else None,
            **({"hf_adapter": wd.location(ADAPTER_EXPORT)} if adapter_dir else {}),
            report=wd.location("report.md") if report else None,
            **({"derived_hparams": derived} if derived else {}),
        )


# --- the resume point ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Resume:
    """What the workdir already holds: the latest complete checkpoint, and whether the run finished."""

    checkpointer: Checkpointer
    latest: int | None
    meta: dict[str, Any]
    finished: bool


def open_checkpoints(prep: Prepared, wd: Workdir) -> Resume:
    """The workdir's checkpoints; refuses a workdir that holds a run with another configuration."""
    checkpointer = Checkpointer(wd.checkpoints, keep=prep.config.checkpoint.keep)
    latest = checkpointer.latest_step()
    meta = checkpointer.read_meta(latest) if latest is not None else {}
    if latest is not None:
        diff = config_differences(meta.get("config", {}), prep.config.to_dict())
        if diff:
            checkpointer.close()
            raise WorkdirError(
                f"{wd.location()} holds a run with a different configuration ({', '.join(diff[:6])}); use another "
                "--workdir, or delete its checkpoints/ to start over"
            )
    finished = bool(meta.get("finished")) or latest == prep.total_steps
    return Resume(checkpointer, latest, meta, finished)


# --- models -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    lm: LanguageModel  # the trained model's structure (training compute dtype; with its LoRA spec)
    original: dict | None  # the original parameters (donated to the train state when training starts, unless LoRA)
    reference: dict | None  # the frozen original for the method (model.reference_dtype; the base with LoRA)
    oracle: dict | None  # the exact retrain, for the oracle column and distances
    transform: Callable[[dict], dict] | None = None  # the unlearned model from trained parameters
    base: dict | None = None  # with LoRA: the frozen base (lora.base_dtype), the step's second argument

    def unlearned(self, params: dict) -> dict:
        """The unlearned model of trained ``params``: themselves, except for methods with a transform (task
        vectors: the original minus the scaled fine-tuning difference) and LoRA (the base with the adapters
        attached: each layer adds its delta as it runs, no merged copy)."""
        return params if self.transform is None else self.transform(params)

    @property
    def frozen(self) -> dict | None:
        """What the train step receives besides its state: the base with LoRA, else the reference (or None)."""
        return self.base if self.base is not None else self.reference


def load_checkpoint(prep: Prepared, path: str | os.PathLike, dtype: str | None = None) -> tuple[LanguageModel, dict]:
    """A checkpoint on the run's mesh with the run's numerics (``dtype`` overrides the compute dtype)."""
    return hf_checkpoint.load_model(path, prep.config.model, mesh=prep.mesh, rules=prep.config.mesh.rules, dtype=dtype)


def load_models(prep: Prepared, resume: Resume) -> Models:
    """The original (to start, for the reference model and for evaluation), the reference and the oracle."""
    config, ev = prep.config, prep.config.evaluation
    spec = lora_spec(config, prep.model_config)
    lm = LanguageModel(nnx.graphdef(abstract_model(prep.model_config)), prep.model_config)
    original = reference = oracle = base = None
    if resume.latest is None or prep.needs.reference or ev.enabled or spec is not None:
        lm, original = load_checkpoint(prep, prep.model_dir)
    method = get_method(config.method.name)
    shardings = param_shardings(prep.model_config, prep.mesh, config.mesh.rules)
    if spec is not None:  # the base, stored once: the original, the reference and the step's frozen weights
        original = base = _cast(original, config.lora.base_dtype, shardings)
        log.info(
            "LoRA rank %d (alpha %g) on %d weights: %s trainable params (%.2f%% of %s); base frozen in %s",
            spec.rank,
            spec.alpha,
            sum(sum(t.layers) for t in spec.targets),
            f"{spec.num_params():,}",
            100 * spec.num_params() / prep.model_config.num_params,
            f"{prep.model_config.num_params:,}",
            config.lora.base_dtype,
        )
        reference = base if prep.needs.reference else None
    # A finished run still needs the original to rebuild a transformed model (a re-export in another dtype).
    elif prep.needs.reference and (not resume.finished or method.transform is not None):
        reference = _cast(original, reference_dtype(prep.model_config, config.model.reference_dtype), shardings)
    if ev.enabled and ev.oracle_model:
        _, oracle = load_checkpoint(prep, ev.oracle_model)
    transform = None
    if method.transform is not None:
        hparams = method_hparams(config.method)
        apply = jax.jit(lambda p, r: method.transform(p, r, hparams), out_shardings=shardings)
        transform = lambda params: apply(params, reference)  # noqa: E731
    if spec is not None:  # evaluated as the base with the adapters attached; export merges (export())
        attached = lambda adapters: lora.attach(base, adapters)  # noqa: E731
        merge = jax.jit(lambda p: lora.merge(spec, p, prep.model_config.param_dtype), out_shardings=shardings)
        transform = attached if transform is None else (lambda a, t=transform: t(merge(attached(a))))
    return Models(lm.with_lora(spec), original, reference, oracle, transform, base)


def _cast(params: dict, dtype: str, shardings: dict) -> dict:
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=shardings)(params)


# --- evaluation before and after ------------------------------------------------------------------------------


def make_evaluations(prep: Prepared, wd: Workdir, models: Models) -> RunEvaluations | None:
    """The run's evaluations (None with ``evaluation.enabled=False``)."""
    return RunEvaluations.for_run(prep, models.lm, wd.path) if prep.config.evaluation.enabled else None


def evaluate_before(prep: Prepared, evals: RunEvaluations | None, models: Models) -> dict[str, Any]:
    """The original's (and the oracle's) metrics and the history's step-0 entry, before the original parameters
    are donated to training."""
    if evals is None:
        return {"results": {}, "history": []}
    results = {}
    if models.oracle is not None:
        oracle = evals.evaluate("oracle", models.oracle, model_path=prep.config.evaluation.oracle_model)
        evals.oracle = Oracle(models.oracle, oracle)
    results["original"] = evals.evaluate("original", models.original, model_path=prep.config.model.path)
    if models.oracle is not None:
        results["oracle"] = oracle
    history = evals.history(0) or [evals.in_run(models.original, 0)]
    return {"results": results, "history": history}


def evaluate_after(
    prep: Prepared,
    wd: Workdir,
    evals: RunEvaluations | None,
    before: dict[str, Any],
    trained: LoopResult,
    rule: StoppingRule | None,
    params: dict,
) -> dict[str, Any] | None:
    """The unlearned model's (``params``) metrics, the cross-model ones (PrivLeak), and the report."""
    if evals is None:
        return None
    end = trained.steps
    history = evals.history(end)
    if not history or history[-1]["step"] != end:
        history.append(evals.in_run(params, end))
    results = {**before["results"], "unlearned": evals.evaluate("unlearned", params)}
    evals.finalize(results)
    return write_report(
        wd.path,
        stamp=stamp(wd.record, end, trained.stopped),
        results=results,
        metrics=list(prep.config.evaluation.metrics),
        options={m.name: options for m, options in evals.metrics},
        history=history,
        compute=compute_summary(prep, end),
        stop_target=rule.target if rule else None,
    )


# --- settings measured on the original -----------------------------------------------------------------------


def resolve_method(
    method: ml_collections.ConfigDict, before: dict[str, Any]
) -> tuple[ml_collections.ConfigDict, dict[str, float]]:
    """``config.method`` with the hyper-parameters a run derives from the original model's measurements, and
    those values: ``forget_nll_cap = ln(approximate perplexity) + forget_nll_cap_margin`` (the original's mean
    chunk NLL on unseen text, from its full evaluation, else the step-0 history) when the margin is > 0, so the
    same margin means the same thing on any data and tokenizer. Deterministic: a resumed run derives the same."""
    margin = method.get("forget_nll_cap_margin", 0.0)
    if not margin:
        return method, {}
    perplexity = before["results"].get("original", {}).get("perplexity") or before["history"][0]["perplexity"]
    approximate_nll = perplexity["approximate"]["nll"]  # mean chunk NLL = ln(perplexity)
    resolved = ml_collections.ConfigDict(method.to_dict())
    resolved.forget_nll_cap = approximate_nll + margin
    log.info(
        "forget_nll_cap = %.4f nats: the original's approximate-split NLL %.4f + forget_nll_cap_margin %g",
        resolved.forget_nll_cap,
        approximate_nll,
        margin,
    )
    return resolved, {"forget_nll_cap": resolved.forget_nll_cap, "approximate_nll": approximate_nll}


# --- training -----------------------------------------------------------------------------------------------


def train(
    prep: Prepared,
    wd: Workdir,
    resume: Resume,
    models: Models,
    evals: RunEvaluations | None,
    rule: StoppingRule | None,
    method: ml_collections.ConfigDict,
) -> LoopResult:
    """The step loop from the resume point to the end (nothing to do for a finished run); ``method`` is the
    resolved ``config.method`` (:func:`resolve_method`)."""
    setup = StepSetup.for_run(prep.config, prep.model_config, prep.mesh, prep.total_steps)
    state, start = initial_state(prep, resume, models, setup)
    if resume.finished:
        log.info("%s already finished at step %d", wd.location(), start)
        return LoopResult(state, start, resume.meta.get("stopped"), dict(resume.meta.get("last_metrics", {})), None)
    trainer = make_trainer(prep, models, setup, start, method)
    with (
        MetricWriter(wd.path, resume_step=start) as writer,
        hooks.signal_hook() as on_signal,
        _progress_bar(prep, start) as bar,
    ):
        add_default_hooks(trainer, prep, wd, resume, evals, rule, writer, bar, on_signal, start)
        try:
            return trainer.run(state, start)
        except NonFiniteError as e:
            resume.checkpointer.wait()
            good = resume.checkpointer.latest_step()
            raise NonFiniteError(
                f"{e}. The last good checkpoint ({'step ' + str(good) if good is not None else 'none yet'}) in "
                f"{resume.checkpointer.directory} is intact. Lower config.optim.lr or the number of steps."
            ) from None
        finally:
            resume.checkpointer.wait()


def initial_state(prep: Prepared, resume: Resume, models: Models, setup: StepSetup) -> tuple[Any, int]:
    """A fresh train state around the original parameters, or the latest checkpoint's; and its step."""
    name, total = prep.config.method.name, prep.total_steps
    if resume.latest is None:
        log.info("starting %s: %d steps of %d chunks", name, total, prep.batcher.chunks_per_step)
        return init_state(setup.initial_params(models.original, prep.config.seed), setup.tx, setup.shardings), 0
    state, _ = resume.checkpointer.restore(resume.latest, setup.abstract_state(prep.model_config))
    start = int(state["step"])
    if not resume.finished:
        log.info("resuming %s from step %d of %d (%s)", name, start, total, resume.checkpointer.directory)
    return state, start


def make_trainer(
    prep: Prepared, models: Models, setup: StepSetup, start: int, method_config: ml_collections.ConfigDict
) -> Trainer:
    """The compiled train step of the run's method (state donated) in a step loop."""
    config = prep.config
    ctx = Context.for_run(
        models.lm, method_config, seed=config.seed, tokenizer=prep.tokenizer, chunk_size=config.train.logits_chunk_size
    )
    method = get_method(method_config.name)
    step_fn, b_shardings = setup.compile(method, ctx, prep.batcher.batch(start), reference=models.reference is not None)
    return Trainer(step_fn, prep.batcher, b_shardings, models.frozen, prep.total_steps, models.transform)


def _progress_bar(prep: Prepared, start: int) -> Any:
    desc = f"unlearning ({prep.config.method.name})"
    return tqdm(total=prep.total_steps, initial=start, desc=desc, unit="step", disable=None)


def add_default_hooks(
    trainer: Trainer,
    prep: Prepared,
    wd: Workdir,
    resume: Resume,
    evals: RunEvaluations | None,
    rule: StoppingRule | None,
    writer: MetricWriter,
    bar: Any,
    on_signal: hooks.Hook,
    start: int,
) -> None:
    """The periodic work of a run, in order: logging, progress, evaluation, the stopping rule, signals,
    checkpoints (after every hook that may end the run), fault injection."""
    config = prep.config
    log_every = config.train.log_every
    trainer.add_hook(lambda info: writer.write(info.step, info.metrics), every=log_every, at_end=True)
    trainer.add_hook(hooks.progress_bar(bar))
    trainer.add_hook(hooks.progress_line(start, log_to_console=bar.disable), every=log_every)
    if evals is not None and config.evaluation.every_steps:
        trainer.add_hook(perplexity_hook(evals, writer), every=config.evaluation.every_steps)
    if evals is not None and rule is not None:
        trainer.add_hook(rule.hook(evals, writer))
    trainer.add_hook(on_signal)
    saver = hooks.checkpoint_hook(resume.checkpointer, lambda info: _meta(prep, wd, info))
    every = dict(every=config.checkpoint.every_steps, minutes=config.checkpoint.every_minutes, at_end=True)
    trainer.add_hook(saver, **every)
    trainer.add_hook(lambda info: wd.sync(), **every)  # a staged workdir
    if os.environ.get(hooks.KILL_AFTER_STEP_ENV):
        trainer.add_hook(hooks.kill_hook(os.environ[hooks.KILL_AFTER_STEP_ENV], resume.checkpointer))


def _meta(prep: Prepared, wd: Workdir, info: hooks.StepInfo) -> dict[str, Any]:
    """What a checkpoint records besides the state: where the run is, how it ended, its config."""
    batcher = prep.batcher
    return {
        "step": info.step,
        "total_steps": info.total,
        "forget_chunks_seen": info.step * batcher.chunks_per_step,
        "epoch": info.step / batcher.steps_per_epoch,
        "finished": info.finishing,
        "stopped": info.stopped,
        "last_metrics": {k: float(v) for k, v in info.metrics.items()},
        "config": wd.record["config"],
    }


# --- export -------------------------------------------------------------------------------------------------


def export(prep: Prepared, wd: Workdir, lm: LanguageModel, params: dict, resume: Resume) -> Path | None:
    """The unlearned model in Hugging Face format (``hf_model/``), unless a finished run already exported it
    in the requested dtype (LoRA adapters merged into it). Non-finite parameters are never exported."""
    config = prep.config
    if not config.checkpoint.export:
        return None
    target = wd.path / EXPORT
    dtype = hf_checkpoint.export_dtype(prep.model_config, config.checkpoint.export_dtype or None)
    if resume.finished and sharding.from_process0(_exported_dtype(target) == dtype):
        return target
    if not bool(jax.device_get(jax.jit(all_finite)(params))):
        raise NonFiniteError(f"the parameters to export to {target} are not finite; nothing was exported")
    if lora.split(params)[1] is not None:  # LoRA: the adapters merged into the base, in the export's dtype
        shardings = param_shardings(prep.model_config, prep.mesh, config.mesh.rules)
        params = jax.jit(lambda p: lora.merge(lm.lora, p, dtype), out_shardings=shardings)(params)
    generation = hf_checkpoint.read_generation_config(prep.model_dir)  # so that it generates as the source did
    hf_checkpoint.save_pretrained(
        lm.bind(params), target, tokenizer=prep.tokenizer, dtype=dtype, generation_config=generation
    )
    return target


def export_adapter(prep: Prepared, wd: Workdir, lm: LanguageModel, adapters: dict) -> Path | None:
    """With LoRA, the trained adapters alone in PEFT's format (``hf_adapter/``): ``PeftModel.from_pretrained`` puts
    them on the original checkpoint (``config.model.path``)."""
    if lm.lora is None or not prep.config.checkpoint.export:
        return None
    target = wd.path / ADAPTER_EXPORT
    if jax.process_index() == 0:
        lora.save_peft(lm.lora, adapters, target, prep.config.model.path)
    return target


def _exported_dtype(target: Path) -> str | None:
    try:
        return json.loads((target / "config.json").read_text()).get("dtype")
    except (OSError, ValueError):
        return None
