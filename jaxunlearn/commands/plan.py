"""Command line: ``jaxunlearn-plan --config=ga_kl:arxiv --topology=v5e-16 [--search] [--json]``
(= ``python -m jaxunlearn.commands.plan``).

Will this run fit that TPU slice? Compiles the run's exact train and evaluation steps for the slice with the real
TPU compiler, on any machine (libtpu must be installed: ``pip install "jax[tpu]"``; no TPU needed), and prints the
per-chip memory, tokens and model FLOPs per step. Only the model's ``config.json`` is read: shipped shapes work
offline (``--config.model.path=shapes:yi-6b``; see ``jaxunlearn/models/shapes/``). Exit status: 0 fits (or ``--search``
found a setting), 1 does not fit, 2 bad input.

On a CPU machine set ``JAX_PLATFORMS=cpu`` to skip looking for a local TPU (and its warnings); on a TPU VM
nothing needs setting.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from absl import flags
from ml_collections import config_flags

from jaxunlearn.commands.cli import CONFIG_HELP, fail, loaded_config, refusals, run_command


def define_flags() -> SimpleNamespace:
    """The command's flags (defined when it runs: :func:`jaxunlearn.commands.cli.run_command`)."""
    return SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=True),
        topology=flags.DEFINE_string("topology", None, "TPU slice: v5e-16, v4-32, v5p-8, v6e-8 or v5e:4x4."),
        slices=flags.DEFINE_integer(
            "slices", 1, "Number of slices (multislice; the data axis spans them). Default: config.mesh.dcn_data."
        ),
        search=flags.DEFINE_boolean(
            "search",
            False,
            "Search remat, micro batch, fsdp x tensor, reference dtype; LoRA (rank 16) when full fine-tuning fits none.",
        ),
        json=flags.DEFINE_boolean("json", False, "Print JSON instead of tables."),
        evaluation=flags.DEFINE_boolean(
            "evaluation", True, "Also compile the evaluation step (with LoRA: and the merge every LoRA run ends with)."
        ),
        max_compiles=flags.DEFINE_integer("max_compiles", 12, "With --search: stop after this many compilations."),
    )


def main(argv: list[str], args: SimpleNamespace) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not args.topology.value:
        fail("--topology is required (e.g. --topology=v5e-16)")
    if args.max_compiles.value < 1:
        fail(f"--max_compiles={args.max_compiles.value}: give a number of compilations >= 1")
    config = loaded_config(args.config)
    from jaxunlearn.planning.planner import describe, plan_step
    from jaxunlearn.planning.search import search
    from jaxunlearn.planning.topology import TopologyError, parse_topology

    try:
        topology = parse_topology(
            args.topology.value, args.slices.value if args.slices.present else config.mesh.dcn_data
        )
        if args.search.value:
            result = search(
                config,
                topology,
                max_compiles=args.max_compiles.value,
                on_plan=None if args.json.value else _show,
                evaluation=args.evaluation.value,
            )
            _report_search(result, args.json.value)
            sys.exit(0 if result.best is not None else 1)
        plan = plan_step(config, topology, evaluation=args.evaluation.value)
    except (*refusals(), TopologyError) as e:
        fail(str(e))
    print(json.dumps(plan.to_json(), indent=2) if args.json.value else describe(plan))
    sys.exit(0 if plan.fits else 1)


def _show(plan) -> None:
    from jaxunlearn.planning.planner import describe

    print(describe(plan), end="\n\n", flush=True)


def _report_search(result, as_json: bool) -> None:
    if as_json:
        out = {
            "recommended": result.best.to_json() if result.best else None,
            "candidates": [p.to_json() for p in result.plans],
            "exhausted": result.exhausted,
            "lora_fallback": result.lora_fallback,
        }
        print(json.dumps(out, indent=2))
        return
    if result.best is None:
        why = "" if result.exhausted else f" within --max_compiles={len(result.plans)}"
        print(f"no setting fits{why}")
        if not result.exhausted and not any("lora.rank" in p.settings for p in result.plans):
            print("LoRA settings are tried once no full fine-tuning setting fits: raise --max_compiles to reach them")
        return
    from jaxunlearn.planning.planner import settings_flags

    flags_text = settings_flags(result.best.settings)
    if result.lora_fallback:
        s = result.best.settings
        print(
            f"no full fine-tuning setting fits: this is a LoRA setting (rank-{s['lora.rank']} adapters trained over "
            f"a frozen {s['lora.base_dtype']} base)"
        )
    kind = "LoRA " if "lora.rank" in result.best.settings else ""
    print(
        f"recommended {kind}({result.best.flops_per_step:.3e} FLOPs per step, {result.best.train.total / 2**30:.2f} "
        f"GiB per chip):\n  {flags_text}"
    )


def run() -> None:
    run_command(main, __name__, define_flags)


if __name__ == "__main__":
    run()
