"""Evaluate any checkpoint with the same loop, metrics and report as unlearning runs.

    jaxunlearn-evaluate --config=ga --model=PATH_OR_ID [--workdir=DIR] [--config.KEY=VALUE ...]

``--model`` is a Hugging Face directory, a Hub id, a jaxunlearn run directory (its exported ``hf_model/``), or a
PEFT LoRA adapter directory (``adapter_config.json``; a LoRA run's ``hf_adapter/``), evaluated on the base model
its config names or ``--base_model``.
The config supplies the data splits (``data.forget``/``approximate``/``retain``/``general``), the model's
numerics (``model.param_dtype``/``dtype``/``remat``/``attention_impl``) and the ``evaluation`` options; its
method and training settings are ignored. Writes ``report.json``, ``report.md`` and plots to ``--workdir``
(default ``workdirs/eval-<model name>``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from absl import flags
from ml_collections import config_flags

from jaxunlearn.commands.cli import CONFIG_HELP, loaded_config, refusals, run_command
from jaxunlearn.commands.cli import fail as _fail
from jaxunlearn.parallel import cpu_devices
from jaxunlearn.storage import locations


def resolve_model(path: str) -> str:
    """A jaxunlearn run directory (local or at a URL) stands for its exported model."""
    from etils import epath

    url = locations.remote(path, "--model")
    p = url if url is not None else epath.Path(Path(path).expanduser())
    if (p / "run.json").exists() and not (p / "config.json").exists():
        if (p / "hf_model" / "config.json").exists():
            return locations.join(path, "hf_model")
        raise FileNotFoundError(f"{path} is a jaxunlearn run without an exported hf_model/ (unfinished, or export off)")
    return path


def adapter_base(adapter: str, base_model: str = "") -> str:
    """The base model a PEFT adapter directory goes on: ``base_model``, else its ``base_model_name_or_path``."""
    import json

    from jaxunlearn.models import lora

    if base_model:
        return base_model
    base = json.loads((Path(adapter) / lora.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    if not base:
        raise FileNotFoundError(f"{adapter}/{lora.ADAPTER_CONFIG} names no base model: give --base_model=PATH_OR_ID")
    return base


def evaluate(config, model: str, workdir: str | Path, base_model: str = "") -> dict:
    """Evaluate ``model`` on the config's splits; returns the report dict. A PEFT adapter directory is evaluated
    on ``base_model`` (default: the base its ``adapter_config.json`` names)."""
    from jaxunlearn.models import lora
    from jaxunlearn.parallel import sharding
    from jaxunlearn.run import logs
    from jaxunlearn.run.prepare import prepare

    locations.check(workdir, "--workdir")  # before any work
    if config.get("distributed", False):
        sharding.initialize_distributed()  # before any device is used
    adapter = None
    if locations.remote(model, "--model") is None and lora.is_peft_dir(Path(model).expanduser()):
        adapter, config.model.path = (
            str(Path(model).expanduser()),
            adapter_base(str(Path(model).expanduser()), base_model),
        )
    else:
        config.model.path = resolve_model(model)
    config.evaluation.enabled = True
    config.evaluation.oracle_model = ""  # one model: nothing to compare with
    logs.configure_logging()
    prep = prepare(config, training=False)
    with locations.output_directory(workdir, "--workdir") as local:
        try:
            logs.attach_log_file(local)
            return _evaluate_into(prep, model, local, adapter)
        finally:
            logs.detach_log_file()


def _evaluate_into(prep, model: str, workdir: Path, adapter: str | None = None) -> dict:
    """The evaluation and its report, written to the local directory ``workdir``; ``adapter``: a PEFT LoRA
    directory applied to the loaded model."""
    from jaxunlearn.evaluation.report import write_report
    from jaxunlearn.evaluation.runner import RunEvaluations
    from jaxunlearn.run.engine import load_checkpoint
    from jaxunlearn.run.record import data_sources, environment

    ev = prep.config.evaluation
    lm, params = load_checkpoint(prep, prep.model_dir)
    if adapter is not None:
        lm, params = _with_adapter(prep, lm, params, adapter)
    evals = RunEvaluations.for_run(prep, lm, workdir)
    results = {"model": evals.evaluate("model", params, cache=False)}
    evals.finalize(results)
    env = environment(prep.mesh)
    stamp = {
        "title": f"evaluation of {model}",
        "model": {
            "path": model,
            **({"base_model": prep.config.model.path} if adapter else {}),
            "model_type": prep.model_config.model_type,
            "num_params": prep.model_config.num_params,
        },
        "data": data_sources(prep),
        "seed": prep.config.seed,
        "mesh": env["mesh"]["shape"],
        "dtypes": {"param": prep.model_config.param_dtype, "evaluation": evals.evaluator.lm.config.dtype},
        "versions": env["versions"],
        "device": f"{env['device_count']} x {env['device_kind']}",
        "config": prep.config.to_dict(),
    }
    return write_report(
        workdir,
        stamp=stamp,
        results=results,
        metrics=list(ev.metrics),
        options={m.name: options for m, options in evals.metrics},
    )


def _with_adapter(prep, lm, params: dict, adapter: str):
    """The model with a PEFT adapter's LoRA weights attached (applied layer by layer, not merged)."""
    import jax

    from jaxunlearn.models import lora
    from jaxunlearn.parallel import sharding
    from jaxunlearn.training.step import adapter_shardings

    spec, adapters, _ = lora.load_peft(adapter, prep.model_config)
    rules = sharding.normalize_rules(prep.config.mesh.rules)
    adapters = jax.device_put(adapters, adapter_shardings(spec, prep.model_config, prep.mesh, rules))
    return lm.with_lora(spec), lora.attach(params, adapters)


def define_flags() -> SimpleNamespace:
    """The command's flags (defined when it runs: :func:`jaxunlearn.commands.cli.run_command`)."""
    return SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=True),
        model=flags.DEFINE_string("model", None, "HF directory, Hub id, jaxunlearn run directory, or PEFT adapter."),
        base_model=flags.DEFINE_string("base_model", "", "With a PEFT adapter as --model: the model it goes on."),
        workdir=flags.DEFINE_string("workdir", None, "Where to write the report (default: workdirs/eval-<model>)."),
    )


def main(argv: list[str], args: SimpleNamespace) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    model = args.model.value
    if not model:
        _fail("--model=PATH_OR_ID is required")
    config = loaded_config(args.config)
    cpu_devices.configure(config)  # before JAX starts: one CPU device per core
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    workdir = args.workdir.value or str(Path("workdirs") / f"eval-{Path(model.rstrip('/')).name}")
    try:
        evaluate(config, model, workdir, base_model=args.base_model.value)
    except (*refusals(), FileNotFoundError) as e:
        _fail(str(e))
    print(f"report: {locations.join(locations.shown(workdir), 'report.md')}", file=sys.stdout)


def run() -> None:
    run_command(main, __name__, define_flags)


if __name__ == "__main__":
    run()
