"""Command line: ``python -m jaxunlearn.main --config=configs/ga_kl.py [--workdir=DIR] [--config.KEY=VALUE ...]``.

Runs (or resumes) one unlearning run. Exit status: 0 done, 2 bad input (config, data, checkpoint, mesh),
3 non-finite loss, 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from jaxunlearn.cli import fail as _fail
from jaxunlearn.cli import parse_flags as _parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<config file name>).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        _fail("--config=CONFIG_FILE is required (e.g. --config=configs/ga_kl.py)")
    import jax
    from absl import logging as absl_logging

    from jaxunlearn.config import ConfigError
    from jaxunlearn.data import DataError
    from jaxunlearn.engine import NonFiniteError, WorkdirError, unlearn
    from jaxunlearn.evaluation.report import summary
    from jaxunlearn.hf_checkpoint import CheckpointError
    from jaxunlearn.models import UnsupportedModelError
    from jaxunlearn.sharding import MeshError

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint file at INFO
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or str(Path("workdirs") / Path(config_path).stem.split(":")[0])
    try:
        record = unlearn(_CONFIG.value, workdir)
    except (ConfigError, DataError, CheckpointError, MeshError, UnsupportedModelError, WorkdirError) as e:
        _fail(str(e))
    except NonFiniteError as e:
        _fail(str(e), code=3)
    except KeyboardInterrupt as e:
        _fail(f"interrupted: {e or 'rerun the same command to resume'}", code=130)
    print(f"unlearned model: {record.get('hf_model') or workdir}")
    print(f"run record:      {Path(workdir).absolute() / 'run.json'}")
    if record.get("report"):
        print(f"report:          {Path(record['report']).absolute()}")
        if jax.process_index() == 0:
            print(summary(json.loads(Path(record["report"]).with_suffix(".json").read_text())))


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
