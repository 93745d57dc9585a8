"""``--search``: the cheapest setting of a run that fits a slice, by model FLOPs including recompute.

The grid varies what changes memory but not the result: the remat policy, the micro batch per chip (gradient
accumulation keeps the chunks per optimizer step), the fsdp x tensor split, the reference model's dtype and
whether forget and retain chunks take one backward pass or one each (``train.split_passes``). FLOPs depend on
the remat policy only, so policies are tried from the cheapest; within one, the leanest setting is compiled
first and the group is skipped when even that does not fit, then settings are tried in order of preference
(bigger micro batches, no tensor parallelism, an exact reference, one pass) until one fits.

When no full fine-tuning setting fits, the same search runs once more with LoRA (:data:`LORA_FALLBACK`: rank-16
adapters on every linear weight of the decoder layers, over a frozen bfloat16 base that doubles as the reference).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from jaxunlearn.errors import ConfigError
from jaxunlearn.methods.registry import resolve_needs
from jaxunlearn.models import lora
from jaxunlearn.planning.planner import StepPlan, model_config_for_plan, plan_step
from jaxunlearn.planning.topology import Topology

log = logging.getLogger("jaxunlearn")

REMAT_BY_RECOMPUTE = ("none", "dots", "dots_no_batch", "full")  # least recompute first
MICRO_PER_CHIP = (4, 2, 1)
TENSOR = (1, 2, 4, 8)
# Tried when full fine-tuning fits no setting (a config with lora.rank > 0 is searched as it is).
LORA_FALLBACK = {"lora.rank": 16, "lora.base_dtype": "bfloat16", "lora.targets": lora.ALL_LINEAR}


@dataclasses.dataclass
class SearchResult:
    plans: list[StepPlan]  # every compiled candidate, in the order tried
    best: StepPlan | None  # the recommended one (None: nothing fits)
    exhausted: bool  # False when max_compiles stopped the search early
    lora_fallback: bool = False  # best is a LoRA setting (LORA_FALLBACK) because full fine-tuning fits none


def with_settings(config: ml_collections.ConfigDict, settings: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``{"section.key": value}`` applied."""
    out = copy.deepcopy(config)
    with out.unlocked():
        for key, value in settings.items():
            section, name = key.split(".")
            out[section][name] = value
    return out


def _chunks_per_step(config: ml_collections.ConfigDict) -> int:
    return config.train.micro_batch_size * config.train.grad_accum_steps


def lean_settings(config: ml_collections.ConfigDict, topology: Topology, remat: str, tensor: int) -> dict | None:
    """The least memory-hungry setting of one (remat, tensor) group: one chunk per chip, one pass per split, a
    bfloat16 reference. ``None`` when the chunks per step cannot be spread over the chips."""
    chips = topology.chips_per_slice
    batch_ways = chips // tensor * topology.slices
    chunks = _chunks_per_step(config)
    if chunks % batch_ways:
        return None
    needs = resolve_needs(config.method)
    # With LoRA the frozen base is the reference (model.reference_dtype plays no part).
    exact_reference = not needs.reference or config.model.param_dtype == "bfloat16" or config.lora.rank > 0
    return {
        "model.remat": remat,
        "mesh.data": 1,  # per slice: the global data axis is data x dcn_data, one way per slice
        "mesh.fsdp": chips // tensor,
        "mesh.tensor": tensor,
        **({"mesh.dcn_data": topology.slices} if topology.slices > 1 else {}),
        "train.micro_batch_size": batch_ways,
        "train.grad_accum_steps": chunks // batch_ways,
        "train.split_passes": needs.retain,
        "model.reference_dtype": "" if exact_reference else "bfloat16",
    }


def improvements(config: ml_collections.ConfigDict, settings: dict) -> Iterator[dict]:
    """Settings that each use more memory than ``settings`` for more speed or exactness, most wanted first:
    one pass for both splits, more chunks per chip, then a reference in the master weights' dtype."""
    chunks = _chunks_per_step(config)
    if settings["train.split_passes"]:
        yield {**settings, "train.split_passes": False}
    for factor in (2, 4):
        micro = settings["train.micro_batch_size"] * factor
        if chunks % micro == 0:
            yield {**settings, "train.micro_batch_size": micro, "train.grad_accum_steps": chunks // micro}
    if settings["model.reference_dtype"]:
        yield {**settings, "model.reference_dtype": ""}


def groups(config: ml_collections.ConfigDict, topology: Topology) -> Iterator[tuple[str, int]]:
    """(remat, tensor) pairs, cheapest FLOPs first; tensor sizes that split the heads and the slice."""
    model = model_config_for_plan(config)
    for remat in REMAT_BY_RECOMPUTE:
        for tensor in TENSOR:
            if model.num_kv_heads % tensor or model.num_heads % tensor or topology.chips_per_slice % tensor:
                continue
            yield remat, tensor


def search(
    config: ml_collections.ConfigDict,
    topology: Topology,
    *,
    max_compiles: int = 12,
    devices: list[Any] | None = None,
    on_plan: Callable[[StepPlan], None] | None = None,
    evaluation: bool = True,
) -> SearchResult:
    """The setting with the fewest FLOPs per step (recompute included) that fits ``topology``.

    Groups are tried from the cheapest; the first whose leanest setting fits wins, and that setting is then
    improved greedily (:func:`improvements`) while the result still fits. ``evaluation``: the evaluation step
    must fit too (with LoRA it includes merging the adapters, which every LoRA run does at its end).
    """
    devices = devices if devices is not None else topology.devices()
    plans: list[StepPlan] = []
    chosen: list[StepPlan] = []  # the greedy search's current best, kept if the budget runs out

    def compile_one(settings: dict) -> StepPlan | None:
        if len(plans) >= max_compiles:
            raise _Budget
        try:
            plan = plan_step(with_settings(config, settings), topology, devices=devices, evaluation=evaluation)
        except (ConfigError, ValueError) as e:
            log.info("skipping %s: %s", settings, e)
            return None
        plans.append(plan)
        if on_plan:
            on_plan(plan)
        return plan

    try:
        for extra in _modes(config):
            mode = with_settings(config, extra)
            for remat, tensor in groups(mode, topology):
                settings = lean_settings(mode, topology, remat, tensor)
                settings = {**extra, **settings} if settings else None
                best = compile_one(settings) if settings else None
                if best is not None and best.fits:
                    best = _improve(mode, settings, best, compile_one, chosen)
                    return SearchResult(plans, best, exhausted=True, lora_fallback=bool(extra))
    except _Budget:
        fallback = bool(chosen) and not config.lora.rank and "lora.rank" in chosen[-1].settings
        return SearchResult(plans, chosen[-1] if chosen else None, exhausted=False, lora_fallback=fallback)
    return SearchResult(plans, None, exhausted=True)


def _modes(config: ml_collections.ConfigDict) -> Iterator[dict]:
    """The settings each round of the search starts from: the config's own, then (full fine-tuning only) LoRA."""
    yield {}
    if not config.lora.rank:
        yield LORA_FALLBACK


def _improve(
    config: ml_collections.ConfigDict, settings: dict, best: StepPlan, compile_one: Callable, chosen: list
) -> StepPlan:
    """Take the first improvement that still fits, again and again, until none does (``chosen`` keeps the
    latest choice, for a search stopped by its budget)."""
    chosen.append(best)
    while True:
        for trial in improvements(config, settings):
            plan = compile_one(trial)
            if plan is not None and plan.fits:
                settings, best = trial, plan
                chosen.append(best)
                break
        else:
            return best


class _Budget(Exception):
    """``max_compiles`` reached."""
