"""MUSE's six criteria for one method (Shi et al. 2024, arXiv 2407.06460): the main run, scalability and
sustainability.

    python -m jaxunlearn.commands.muse --config=npo_gd:muse_news [--workdir=workdirs/muse]
        [--criteria=scal,sust] [--folds=2,3,4] [--config.KEY=VALUE ...]

The experiment (``jaxunlearn.experiments.muse_protocol``):
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from absl import flags
from ml_collections import config_flags

from jaxunlearn.commands.cli import CONFIG_HELP, fail, refusals, run_command
from jaxunlearn.experiments import muse_protocol as experiment
from jaxunlearn.parallel import cpu_devices
from jaxunlearn.storage import locations

# The experiment's description follows (``--help`` shows it): its docstring after the title.
if __doc__ and experiment.__doc__:  # None under python -OO
    __doc__ += "\n" + experiment.__doc__.split("\n\n", 1)[1]


def define_flags() -> SimpleNamespace:
    """The command's flags (defined when it runs: :func:`jaxunlearn.commands.cli.run_command`)."""
    return SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", None, f"A MUSE config. {CONFIG_HELP}", lock_config=True),
        workdir=flags.DEFINE_string("workdir", "workdirs/muse", "Experiment directory."),
        criteria=flags.DEFINE_list(
            "criteria", list(experiment.CRITERIA), "Which of scal (C5) and sust (C6) to run besides main."
        ),
        folds=flags.DEFINE_list(
            "folds", [str(k) for k in experiment.FOLDS], "The folds forget_<k> of scal and sust (MUSE's: 2, 3, 4)."
        ),
    )


def main(argv: list[str], args: SimpleNamespace) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir, criteria = args.config.value, args.workdir.value, args.criteria.value
    if config is None:
        fail("--config=CONFIG is required, e.g. --config=npo_gd:muse_news")
    unknown = [c for c in criteria if c not in experiment.CRITERIA]
    if unknown:
        fail(f"--criteria: unknown {', '.join(unknown)}; choose from {', '.join(experiment.CRITERIA)}")
    try:
        folds = [int(f) for f in args.folds.value]
    except ValueError:
        fail(f"--folds={','.join(args.folds.value)}: give fold numbers, e.g. --folds=2,3,4")
    if not config.evaluation.muse.path:
        fail("config.evaluation.muse.path is empty: use a MUSE preset, e.g. --config=npo_gd:muse_news")
    cpu_devices.configure(config)
    try:
        experiment.run_muse(config, workdir, criteria, folds)
    except refusals() as e:  # a run's bad data, model or workdir: one line naming it, not a traceback
        fail(str(e))
    print(f"MUSE table: {locations.join(locations.shown(workdir), 'muse.md')}", file=sys.stdout)


def run() -> None:
    run_command(main, __name__, define_flags)


if __name__ == "__main__":
    run()
