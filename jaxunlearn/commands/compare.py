"""The paper's experiment: all seven methods, each with a small learning-rate sweep, on one world.

    jaxunlearn-compare --config=ga_kl [--workdir=workdirs/compare]      (= python -m jaxunlearn.commands.compare)
        [--methods=ga,ga_kl] [--lr_multipliers=0.3,1,3] [--world_seeds=0,1,2] [--config.KEY=VALUE ...]

The experiment (``jaxunlearn.experiments.compare``):
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

from absl import flags
from ml_collections import config_flags

from jaxunlearn.commands.cli import CONFIG_HELP, fail, loaded_config, refusals, run_command
from jaxunlearn.config.files import config_files
from jaxunlearn.experiments import compare as experiment
from jaxunlearn.parallel import cpu_devices
from jaxunlearn.storage import locations

# The experiment's description follows (``--help`` shows it): its docstring after the title.
if __doc__ and experiment.__doc__:  # None under python -OO
    __doc__ += "\n" + experiment.__doc__.split("\n\n", 1)[1]


def define_flags() -> SimpleNamespace:
    """The command's flags (defined when it runs: :func:`jaxunlearn.commands.cli.run_command`)."""
    args = SimpleNamespace(
        config=config_flags.DEFINE_config_file(
            "config", None, f"The base config (world, data, evaluation). {CONFIG_HELP}", lock_config=True
        ),
        workdir=flags.DEFINE_string("workdir", "workdirs/compare", "Experiment directory."),
        methods=flags.DEFINE_list("methods", list(experiment.VARIANTS), "Shipped config names to compare."),
        lr_multipliers=flags.DEFINE_list(
            "lr_multipliers", ["0.3", "1", "3"], "Learning rates tried, relative to each config's."
        ),
        preset=flags.DEFINE_string(
            "preset",
            "builtin",
            "The preset the variants are built with (builtin, arxiv, github, books, tofu, muse_news, wmdp, ...).",
        ),
        world_seeds=flags.DEFINE_list(
            "world_seeds", [], "Built-in world seeds to repeat the comparison on (default: the config's)."
        ),
    )
    flags.DEFINE_alias("world-seeds", "world_seeds")
    return args


def main(argv: list[str], args: SimpleNamespace) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir, methods, preset = args.workdir.value, args.methods.value, args.preset.value
    config = loaded_config(args.config)
    known = list(config_files())
    if not methods:
        fail(f"--methods is empty: give at least one of the configs {', '.join(known)}")
    unknown = [m for m in methods if m not in known]
    if unknown:
        fail(f"--methods: unknown {', '.join(unknown)}; choose from the configs {', '.join(known)}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    multipliers = lr_multipliers(args.lr_multipliers.value)
    given = ",".join(args.world_seeds.value)
    try:
        seeds = [int(x) for x in args.world_seeds.value]
    except ValueError:
        fail(f"--world_seeds={given}: give integers >= 0, e.g. --world_seeds=0,1,2")
    if any(seed < 0 for seed in seeds):
        fail(f"--world_seeds={given}: give integers >= 0, e.g. --world_seeds=0,1,2")
    if seeds and len(set(seeds)) != len(seeds):
        fail(f"--world_seeds={given}: a seed appears twice")
    if seeds and preset != "builtin":
        fail(f"--world_seeds repeats the comparison on built-in worlds: it needs --preset=builtin, not {preset}")
    cpu_devices.configure(config)  # before JAX starts: one CPU device per core
    explicit = config_flags.get_override_values(flags.FLAGS["config"])
    try:
        result = experiment.run_comparison(config, workdir, methods, multipliers, preset, seeds, explicit)
    except refusals() as e:  # a run's bad data, model or workdir: one line naming it, not a traceback
        fail(str(e))
    print(f"comparison: {locations.join(locations.shown(workdir), 'compare.md')}", file=sys.stdout)
    print(f"best: {result['best']['variant']} at lr {result['best']['lr']:.3g}")


def lr_multipliers(values: list[str]) -> list[float]:
    """``--lr_multipliers`` as numbers: each finite and > 0, at least one; one line naming the flag otherwise."""
    given = ",".join(values)
    try:
        multipliers = [float(x) for x in values]
    except ValueError:
        multipliers = []
    if not multipliers or not all(math.isfinite(m) and m > 0 for m in multipliers):
        fail(f"--lr_multipliers={given}: give numbers > 0, e.g. --lr_multipliers=0.3,1,3")
    return multipliers


def run() -> None:
    run_command(main, __name__, define_flags)


if __name__ == "__main__":
    run()
