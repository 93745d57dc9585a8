"""Evaluate any checkpoint with the same loop and report as unlearning runs.

    python -m jaxunlearn.evaluate --config=configs/ga.py --model=PATH_OR_ID [--workdir=DIR] [--config.KEY=VALUE ...]

``--model`` is a Hugging Face directory, a Hub id, or a jaxunlearn run directory (its exported ``hf_model/``).
The config supplies the data splits (``data.forget``/``approximate``/``retain``/``general``) and the
``evaluation`` options; its method and training settings are ignored. Writes ``report.json``, ``report.md``
and plots to ``--workdir`` (default ``workdirs/eval-<model name>``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from jaxunlearn.cli import fail as _fail
from jaxunlearn.cli import parse_flags as _parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file with get_config().", lock_config=True)
_MODEL = flags.DEFINE_string("model", None, "HF directory, Hub id, or jaxunlearn run directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the report (default: workdirs/eval-<model>).")


def resolve_model(path: str) -> str:
    """A jaxunlearn run directory stands for its exported model."""
    p = Path(path).expanduser()
    if (p / "run.json").exists() and not (p / "config.json").exists():
        if (p / "hf_model" / "config.json").exists():
            return str(p / "hf_model")
        raise FileNotFoundError(f"{p} is a jaxunlearn run without an exported hf_model/ (unfinished, or export off)")
    return path


def evaluate(config, model: str, workdir: str | Path) -> dict:
    """Evaluate ``model`` on the config's splits; returns the report dict."""
    from jaxunlearn import hf_checkpoint
    from jaxunlearn.engine import _reference_for_mia, configure_logging, prepare
    from jaxunlearn.evaluation.loop import Evaluator
    from jaxunlearn.evaluation.report import write_report
    from jaxunlearn.evaluation.suite import EvalOptions, evaluate_model
    from jaxunlearn.models import split_model
    from jaxunlearn.run_record import environment

    config.model.path = resolve_model(model)
    config.evaluation.enabled = True
    configure_logging()
    prep = prepare(config, training=False)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    configure_logging(workdir)
    lm, params = split_model(
        hf_checkpoint.from_pretrained(
            prep.model_dir,
            mesh=prep.mesh,
            rules=config.mesh.rules,
            param_dtype=config.model.param_dtype,
            dtype=config.model.dtype,
        )
    )
    ev = config.evaluation
    evaluator = Evaluator(
        lm, prep.mesh, batch_size=ev.batch_size, chunk_size=config.train.logits_chunk_size, rules=config.mesh.rules
    )
    options = EvalOptions.from_config(ev, config.data.max_length)
    metrics, scores = evaluate_model(
        evaluator, params, prep.tokenizer, prep.eval_splits, options, reference=_reference_for_mia(config, prep.mesh)
    )
    env = environment(prep.mesh)
    stamp = {
        "title": f"evaluation of {model}",
        "model": {
            "path": model,
            "model_type": prep.model_config.model_type,
            "num_params": prep.model_config.num_params,
        },
        "seed": config.seed,
        "mesh": env["mesh"]["shape"],
        "dtypes": {"param": config.model.param_dtype, "compute": config.model.dtype},
        "versions": env["versions"],
        "device": f"{env['device_count']} x {env['device_kind']}",
        "config": config.to_dict(),
    }
    return write_report(workdir, stamp=stamp, models={"model": metrics}, scores={"model": scores})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _MODEL.value:
        _fail("--config=CONFIG_FILE and --model=PATH_OR_ID are required")
    from absl import logging as absl_logging

    from jaxunlearn.config import ConfigError
    from jaxunlearn.data import DataError
    from jaxunlearn.hf_checkpoint import CheckpointError
    from jaxunlearn.models import UnsupportedModelError
    from jaxunlearn.sharding import MeshError

    absl_logging.set_verbosity(absl_logging.WARNING)
    workdir = _WORKDIR.value or str(Path("workdirs") / f"eval-{Path(_MODEL.value.rstrip('/')).name}")
    try:
        evaluate(_CONFIG.value, _MODEL.value, workdir)
    except (ConfigError, DataError, CheckpointError, MeshError, UnsupportedModelError, FileNotFoundError) as e:
        _fail(str(e))
    print(f"report: {Path(workdir).absolute() / 'report.md'}", file=sys.stdout)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
