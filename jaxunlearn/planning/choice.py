"""Which model fits this runtime: the largest of a list of candidates whose unlearning run fits the local TPU
chips, full fine-tuning first and LoRA where full fine-tuning does not fit (the notebook's online default).

>>> topology = local_topology()                       # Colab's TPU v5e runtime: v5e-1; None off TPU
>>> choice = largest_fitting(config, ["01-ai/Yi-6B", "EleutherAI/pythia-1b"], topology)
>>> choice.model, choice.settings                      # e.g. ("EleutherAI/pythia-1b", {"lora.rank": 16})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from jaxunlearn.planning.planner import StepPlan, model_config_for_plan, plan_step
from jaxunlearn.planning.search import LORA_FALLBACK, with_settings
from jaxunlearn.planning.topology import GENERATIONS, Topology, TopologyError, parse_topology

# Bytes per parameter a run needs at the least, before activations: full fine-tuning keeps fp32 weights, gradients
# and two AdamW moments (16); LoRA keeps the frozen base in bfloat16 (2). A candidate above the slice's HBM is
# skipped without compiling (compiling a 6B step takes minutes).
_FLOOR_BYTES = {"full": 16, "lora": 2}


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen model, the settings to apply to the config (``{}`` or LoRA's), and its plan."""

    model: str
    settings: dict[str, Any]
    plan: StepPlan


def local_topology(devices: Sequence[Any] | None = None) -> Topology | None:
    """The TPU slice this process's devices form (a Colab TPU v5e runtime is ``v5e-1``), or ``None`` when they
    are not TPUs of a generation the planner knows."""
    if devices is None:
        import jax

        devices = jax.devices()
    if not devices or devices[0].platform != "tpu":
        return None
    generation = next((g for g in GENERATIONS.values() if g.device_kind == devices[0].device_kind), None)
    if generation is None:
        return None
    try:  # one jax device per chip on every generation the planner knows (v4: megacore)
        return parse_topology(f"{generation.name}-{len(devices) * generation.cores_per_chip_in_name}")
    except TopologyError:
        return None


def largest_fitting(
    config: ml_collections.ConfigDict,
    candidates: Sequence[str],
    topology: Topology,
    *,
    devices: Sequence[Any] | None = None,
    say: Callable[[str], None] = print,
) -> Choice | None:
    """The first of ``candidates`` (largest first) whose run of ``config`` fits ``topology``: full fine-tuning,
    else LoRA (rank 16 over every linear layer, bfloat16 base); ``None`` when none fits. Each try is compiled for
    the slice (:func:`jaxunlearn.planning.plan_step`), after a bytes-per-parameter floor skips hopeless ones."""
    hbm = topology.hbm_bytes * topology.chips
    for model in candidates:
        for mode, settings in (("full", {}), ("lora", dict(LORA_FALLBACK))):
            trial = with_settings(config, {"model.path": model, **settings})
            floor = _FLOOR_BYTES[mode] * model_config_for_plan(trial).num_params
            label = f"{model} ({'full fine-tuning' if mode == 'full' else 'LoRA'})"
            if floor > hbm:
                say(f"{label}: needs at least {floor / 2**30:.1f} GiB, the {topology.name} has {hbm / 2**30:.3g} GiB")
                continue
            plan = plan_step(trial, topology, devices=list(devices) if devices is not None else None)
            say(f"{label}: {plan.train.total / 2**30:.2f} GiB per chip, {'fits' if plan.fits else 'does not fit'}")
            if plan.fits:
                return Choice(model, settings, plan)
    return None
