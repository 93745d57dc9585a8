"""The unlearning command, ``python -m jaxunlearn.main`` or ``jaxunlearn``:

    jaxunlearn --config=ga_kl [--workdir=DIR] [--config.KEY=VALUE ...]

Runs (or resumes) one unlearning run. Exit status: 0 done, 1 a full disk (recorded in run.json), 2 bad input
(config, data, checkpoint, mesh, workdir, unreachable storage), 3 non-finite loss or parameters, 130 interrupted
(rerun the same command to resume). ``--force_workdir`` runs in a directory that holds other files (never
replacing one of them).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from absl import flags
from etils import epath
from ml_collections import config_flags

from jaxunlearn.commands.cli import CONFIG_HELP, fail, interrupted, loaded_config, refusals, run_command
from jaxunlearn.parallel import cpu_devices
from jaxunlearn.storage import locations


def define_flags() -> SimpleNamespace:
    """The command's flags (defined when it runs: :func:`jaxunlearn.commands.cli.run_command`)."""
    return SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=True),
        workdir=flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<config file name>)."),
        force_workdir=flags.DEFINE_bool(
            "force_workdir",
            False,
            "Run in an existing --workdir that holds files jaxunlearn did not write (none of them is replaced).",
        ),
    )


def main(argv: list[str], args: SimpleNamespace) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = loaded_config(args.config)
    cpu_devices.configure(config)  # before JAX starts: one CPU device per core
    import jax
    from absl import logging as absl_logging

    from jaxunlearn.evaluation.report import summary
    from jaxunlearn.run.engine import NonFiniteError, unlearn

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint file at INFO
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = args.workdir.value or str(Path("workdirs") / Path(config_path).stem.split(":")[0])
    try:
        record = unlearn(config, workdir, force_workdir=args.force_workdir.value)
    except refusals() as e:
        fail(str(e))
    except NonFiniteError as e:
        fail(str(e), code=3)
    except KeyboardInterrupt as e:
        interrupted(e)
    except Exception as e:
        if not locations.disk_full(e):
            raise
        fail(
            f"no space left on device while writing the run ({locations.shown(workdir)}); run.json records it and "
            "the last complete checkpoint is kept: free space and rerun the same command to resume",
            code=1,
        )
    shown = locations.shown(workdir)
    print(f"unlearned model: {model_line(record, shown)}")
    print(f"run record:      {locations.join(shown, 'run.json')}")
    if record.get("report"):
        print(f"report:          {record['report']}")
        if jax.process_index() == 0:
            report = locations.read_text(record["report"].removesuffix(".md") + ".json", "report")
            print(summary(json.loads(report)))


def model_line(record: dict, shown: str) -> str:
    """Where the unlearned model is: its export, else its last checkpoint (``checkpoint.export=False``), naming an
    export an earlier run of this workdir left."""
    if record.get("hf_model"):
        return record["hf_model"]
    line = f"not exported (checkpoint.export=False); its last checkpoint is in {locations.join(shown, 'checkpoints')}"
    earlier = locations.join(shown, "hf_model")
    if epath.Path(earlier).exists():
        line += f"; {earlier} holds an earlier export"
    return line


def run() -> None:
    run_command(main, __name__, define_flags)


if __name__ == "__main__":
    run()
