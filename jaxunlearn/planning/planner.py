"""Will a run fit? Compile the run's exact train and evaluation steps for a TPU slice, with abstract arrays only.

The step is built by the same code as a run's (:class:`jaxunlearn.training.step.StepSetup`,
:meth:`jaxunlearn.evaluation.loop.Evaluator.for_run`): same mesh rules, micro batch, gradient accumulation,
remat, logits chunk size and reference dtype. Only ``config.json`` is read; no weights, tokenizer or data. The
TPU compiler's ``memory_analysis()`` gives the per-chip bytes; model FLOPs come from the model's formula (XLA's
cost analysis counts a scanned layer loop once).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxunlearn.config import validate
from jaxunlearn.data.batches import StepBatcher
from jaxunlearn.errors import ConfigError
from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import get_method, resolve_needs
from jaxunlearn.models import LanguageModel, ModelConfig, abstract_model, hf_checkpoint, lora, param_shardings
from jaxunlearn.parallel import sharding
from jaxunlearn.planning.topology import GIB, Topology
from jaxunlearn.training import flops
from jaxunlearn.training import step as step_lib
from jaxunlearn.training.step import StepSetup, reference_dtype
from jaxunlearn.world import WorldRecipe

HEADROOM = 0.10  # a plan fits when it needs at most 90% of a chip's HBM
# Steps a planned run is assumed to take: only the learning-rate schedule depends on it, not the program.
_PLANNED_STEPS = 100


def model_config_for_plan(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture of ``config.model.path`` from its ``config.json`` alone (``shapes:NAME`` for the shipped
    shapes; ``world:target`` for the built-in world's recipe, without building it)."""
    m = config.model
    numerics = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl)
    if m.path.startswith("world:"):
        recipe = WorldRecipe.from_config(config.world)
        return recipe.model_config(recipe.vocab_size, {"eos": 0}).replace(**numerics)
    model_dir = hf_checkpoint.resolve_model_dir(m.path, revision=m.revision or None)
    return ModelConfig.from_hf(hf_checkpoint.read_hf_config(model_dir), **numerics)


def with_slices(config: ml_collections.ConfigDict, topology: Topology) -> ml_collections.ConfigDict:
    """``config`` with ``mesh.dcn_data`` = the topology's number of slices (multislice: the ``data`` axis spans
    them); the default 1 means "as many as the topology has", another value must match it."""
    if config.mesh.dcn_data == topology.slices:
        return config
    if config.mesh.dcn_data != 1:
        raise ConfigError(
            f"config.mesh.dcn_data={config.mesh.dcn_data}: the planned topology {topology.name} has "
            f"{topology.slices} slice(s) (--slices)"
        )
    config = copy.deepcopy(config)
    with config.unlocked():
        config.mesh.dcn_data = topology.slices
    return config


def plan_mesh(config: ml_collections.ConfigDict, topology: Topology, devices: list[Any] | None = None) -> Mesh:
    """The run's ``(data, fsdp, tensor)`` mesh over the slice's devices, built as ``main`` builds it
    (:func:`jaxunlearn.parallel.sharding.make_mesh`): laid out for the physical topology, and with ``mesh.dcn_data``
    slices the ``data`` axis spans them over the data-centre network."""
    devices = devices if devices is not None else topology.devices()
    return sharding.make_mesh(sharding.MeshConfig.from_config(with_slices(config, topology).mesh), devices=devices)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of an abstract tree of ``ShapeDtypeStruct`` with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class Memory:
    """Per-chip bytes of one compiled step."""

    parameters: int
    optimizer: int
    reference: int
    gradients: int  # the fp32 gradient accumulator (inside the compiler's temporaries)
    temporaries: int  # the compiler's temporaries minus the gradient accumulator
    other: int  # batch, scalars, generated code, outputs not aliased to inputs
    total: int
    hbm: int

    @property
    def fits(self) -> bool:
        return self.total <= (1 - HEADROOM) * self.hbm

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class StepPlan:
    """One planned setting: its memory per chip, throughput figures and compile time."""

    settings: dict[str, Any]  # the config values that define it (``model.remat``, ``train.micro_batch_size``...)
    topology: str
    mesh: dict[str, int]
    train: Memory
    evaluation: Memory | None
    tokens_per_step: int
    model_flops_per_step: float  # 6N-style model FLOPs, reference forwards included
    recompute_flops_per_step: float  # what remat and the rematerialised logits chunks add
    compile_seconds: float

    @property
    def fits(self) -> bool:
        return self.train.fits and (self.evaluation is None or self.evaluation.fits)

    @property
    def flops_per_step(self) -> float:
        return self.model_flops_per_step + self.recompute_flops_per_step

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"] = {**self.train.gib(), "fits": self.train.fits}
        out["evaluation"] = None if self.evaluation is None else {**self.evaluation.gib(), "fits": self.evaluation.fits}
        out.update(fits=self.fits, flops_per_step=self.flops_per_step, unit="GiB")
        return out


def plan_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config values a plan (and ``--search``) is about."""
    return {
        "model.remat": config.model.remat,
        "train.micro_batch_size": config.train.micro_batch_size,
        "train.grad_accum_steps": config.train.grad_accum_steps,
        "mesh.data": config.mesh.data,
        "mesh.fsdp": config.mesh.fsdp,
        "mesh.tensor": config.mesh.tensor,
        **({"mesh.dcn_data": config.mesh.dcn_data} if config.mesh.dcn_data > 1 else {}),  # multislice
        "train.split_passes": config.train.split_passes,
        "model.reference_dtype": config.model.reference_dtype,
        **_lora_settings(config.get("lora")),
    }


def _lora_settings(section: ml_collections.ConfigDict | None) -> dict[str, Any]:
    """With LoRA, what changes the program: the rank, the base's dtype and (when not the default) the targets."""
    if not section or not section.rank:
        return {}
    targets = {} if section.targets == lora.ALL_LINEAR else {"lora.targets": section.targets}
    return {"lora.rank": section.rank, "lora.base_dtype": section.base_dtype, **targets}


def plan_step(
    config: ml_collections.ConfigDict, topology: Topology, *, devices: list[Any] | None = None, evaluation: bool = True
) -> StepPlan:
    """Compile ``config``'s train step (and evaluation step) for ``topology`` and measure it."""
    config = with_slices(config, topology)
    validate(config)
    model_config = model_config_for_plan(config)
    mesh = plan_mesh(config, topology, devices)
    ways = sharding.batch_ways(mesh, config.mesh.rules)
    t = config.train
    if t.micro_batch_size % ways:
        raise ConfigError(
            f"config.train.micro_batch_size={t.micro_batch_size}: must be a multiple of the {ways} devices the batch "
            f"is split over on {topology.name}"
        )
    start = time.perf_counter()
    train_memory, needs = _train_memory(config, model_config, mesh, topology)
    eval_memory = _eval_memory(config, model_config, mesh, topology, train_memory) if evaluation else None
    seconds = time.perf_counter() - start
    length, chunks = config.data.max_length, t.micro_batch_size * t.grad_accum_steps
    model_flops = flops.unlearning_step_flops(
        model_config, length, chunks, retain=needs.retain, reference_forwards=needs.reference_forwards
    )
    recompute = flops.recompute_flops_per_step(
        model_config, length, chunks, retain=needs.retain, logits_chunk_size=t.logits_chunk_size
    )
    return StepPlan(
        settings=plan_settings(config),
        topology=topology.name,
        mesh=dict(mesh.shape),
        train=train_memory,
        evaluation=eval_memory,
        tokens_per_step=chunks * length * (2 if needs.retain else 1),
        model_flops_per_step=model_flops,
        recompute_flops_per_step=recompute,
        compile_seconds=round(seconds, 1),
    )


def _abstract_params(model_config: ModelConfig, shardings: dict, dtype: Any = None) -> dict:
    _, state = nnx.split(abstract_model(model_config), nnx.Param)
    shapes = state.to_pure_dict()
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh), shapes, shardings)


def _train_memory(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh, topology: Topology):
    needs = resolve_needs(config.method)
    setup = StepSetup.for_run(config, model_config, mesh, _PLANNED_STEPS)
    graphdef = nnx.graphdef(abstract_model(model_config))
    ctx = Context.for_run(
        LanguageModel(graphdef, model_config),
        config.method,
        seed=config.seed,
        tokenizer=None,
        chunk_size=config.train.logits_chunk_size,
    )
    state = setup.abstract_state(model_config)  # with LoRA: the adapters and their optimizer state
    reference = None
    if setup.lora is not None:  # the frozen base: always the step's second argument, and the method's reference
        reference = _abstract_params(model_config, setup.base_shardings, jnp.dtype(config.lora.base_dtype))
    elif needs.reference:
        ref_dtype = reference_dtype(model_config, config.model.reference_dtype)
        reference = _abstract_params(model_config, setup.param_shardings, ref_dtype)
    t, d = config.train, config.data
    # First-token chunks (data.first_tokens) can be longer than max_length: plan for the longest (an upper bound).
    length = max((d.max_length, *d.first_tokens))
    batch = StepBatcher.abstract_batch(
        t.micro_batch_size, t.grad_accum_steps, length, retain=needs.retain, topics=bool(d.forget2.path)
    )
    step, b_shardings = setup.compile(get_method(config.method.name), ctx, batch, reference=needs.reference)
    batch = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), batch, b_shardings)
    analysis = compiled_memory(step.lower(state, reference, batch), per_chip_bytes((state, reference, batch)))
    gradients = per_chip_bytes(_as_float32(state["params"]))  # fp32 sums of the trained parameters' gradients
    if setup.lora is None:
        parts = dict(
            parameters=per_chip_bytes(state["params"]),
            optimizer=per_chip_bytes(state["opt_state"]),
            reference=per_chip_bytes(reference) if reference is not None else 0,
        )
    else:  # the frozen base is the parameters and the reference; the adapters themselves count as other
        parts = dict(parameters=per_chip_bytes(reference), optimizer=per_chip_bytes(state["opt_state"]), reference=0)
    return _memory(analysis, parts, gradients, topology), needs


def _as_float32(tree: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding), tree)


def _eval_memory(
    config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh, topology: Topology, train: Memory
) -> Memory:
    """The evaluation pass, as run during training (the optimizer state and the reference stay resident).

    With LoRA the evaluated model is the frozen base with the adapters attached (each layer adds its delta as it
    runs), the adapters' optimizer state staying resident; the export's merge (base and adapters in, the merged
    model out in the export's dtype) is compiled too, and the larger of the two is the evaluation's memory."""
    ev = config.evaluation
    eval_config = model_config.replace(dtype=ev.dtype) if ev.dtype else model_config
    lora_spec = step_lib.lora_spec(config, model_config)
    lm = LanguageModel(nnx.graphdef(abstract_model(eval_config)), eval_config, lora_spec)
    evaluator = Evaluator.for_run(lm, mesh, config)
    rules = sharding.normalize_rules(config.mesh.rules)

    params = _abstract_params(model_config, param_shardings(model_config, mesh, rules))
    if lora_spec is not None:
        setup = StepSetup.for_run(config, model_config, mesh, _PLANNED_STEPS)
        state = setup.abstract_state(model_config)
        base = _abstract_params(model_config, setup.base_shardings, jnp.dtype(config.lora.base_dtype))
        params = lora.attach(base, state["params"])
    spec = sharding.named_sharding(("batch", "length"), rules, mesh, (evaluator.batch_size, config.data.max_length))
    tokens = jax.ShapeDtypeStruct((evaluator.batch_size, config.data.max_length), jnp.int32, sharding=spec)
    analysis = compiled_memory(evaluator.stats_step().lower(params, tokens, tokens), per_chip_bytes((params, tokens)))
    if lora_spec is None:
        parts = dict(parameters=per_chip_bytes(params), optimizer=train.optimizer, reference=train.reference)
        return _memory(analysis, parts, 0, topology, resident=train.optimizer + train.reference)
    # LoRA: the base and the adapters are the evaluation's arguments; the adapters' AdamW state stays resident.
    parts = dict(parameters=per_chip_bytes(params), optimizer=train.optimizer, reference=0)
    stats = _memory(analysis, parts, 0, topology, resident=train.optimizer)
    dtype = hf_checkpoint.export_dtype(model_config, config.checkpoint.export_dtype or None)
    merge = jax.jit(lambda p: lora.merge(lora_spec, p, dtype), out_shardings=param_shardings(model_config, mesh, rules))
    merging = _memory(compiled_memory(merge.lower(params), per_chip_bytes(params)), parts, 0, topology, train.optimizer)
    return stats if stats.total >= merging.total else merging


@dataclasses.dataclass
class _Analysis:
    """What the compiler reports (``memory_analysis()``), or what it said when the program cannot fit at all."""

    argument_size_in_bytes: int
    output_size_in_bytes: int
    alias_size_in_bytes: int
    temp_size_in_bytes: int
    generated_code_size_in_bytes: int = 0


_OUT_OF_MEMORY = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")


def compiled_memory(lowered: Any, argument_bytes: int) -> Any:
    """``lowered.compile().memory_analysis()``; when the TPU compiler refuses a program whose temporaries alone
    exceed the chip's HBM, the sizes its error message gives (the step then does not fit)."""
    try:
        return lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        found = _OUT_OF_MEMORY.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        temp = int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)
        return _Analysis(argument_bytes, 0, 0, temp)


def _memory(analysis: Any, parts: dict[str, int], gradients: int, topology: Topology, resident: int = 0) -> Memory:
    arguments = analysis.argument_size_in_bytes
    outputs = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    temp = analysis.temp_size_in_bytes
    code = getattr(analysis, "generated_code_size_in_bytes", 0)
    total = arguments + outputs + temp + code + resident
    named = sum(parts.values())
    other = total - named - temp
    return Memory(
        parameters=parts["parameters"],
        optimizer=parts["optimizer"],
        reference=parts["reference"],
        gradients=min(gradients, temp),
        temporaries=temp - min(gradients, temp),
        other=max(other, 0),
        total=total,
        hbm=topology.hbm_bytes,
    )


def settings_flags(settings: dict[str, Any]) -> str:
    """``{"model.remat": "full", ...}`` as the command-line flags ``main`` takes (strings shell-quoted)."""
    return " ".join(
        f"--config.{k}={_quoted(v)}" if isinstance(v, str) else f"--config.{k}={v}" for k, v in settings.items()
    )


def _quoted(text: str) -> str:
    """``'text'`` for the shell, backslashes kept as they are (a LoRA targets regex); ``shlex`` when it has quotes."""
    return f"'{text}'" if "'" not in text else shlex.quote(text)


def describe(plan: StepPlan) -> str:
    """A one-plan table for the terminal."""
    rows = [("", "train step", "evaluation step")]
    fields = ["parameters", "optimizer", "reference", "gradients", "temporaries", "other", "total"]
    for f in fields:
        train = getattr(plan.train, f) / GIB
        ev = getattr(plan.evaluation, f) / GIB if plan.evaluation else float("nan")
        rows.append((f, f"{train:.2f} GiB", f"{ev:.2f} GiB" if plan.evaluation else "-"))
    hbm = plan.train.hbm / GIB
    rows.append(
        (
            f"fits {hbm:.0f} GiB (10% headroom)",
            _yes(plan.train.fits),
            _yes(plan.evaluation.fits) if plan.evaluation else "-",
        )
    )
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>15}" for r in rows]
    settings = settings_flags(plan.settings)
    head = [
        f"{plan.topology}  mesh {json.dumps(plan.mesh)}  compiled in {plan.compile_seconds:.0f} s",
        f"  {settings}",
    ]
    tail = [
        f"tokens per step: {plan.tokens_per_step:,}",
        f"model FLOPs per step: {plan.model_flops_per_step:.3e}  + recompute {plan.recompute_flops_per_step:.3e}"
        f"  = {plan.flops_per_step:.3e}",
    ]
    if "lora.rank" in plan.settings:
        tail.append(
            f"LoRA rank {plan.settings['lora.rank']}: parameters = the frozen {plan.settings['lora.base_dtype']} base "
            "(evaluation: the base with the adapters attached, or the export's merge in its dtype if larger), "
            "optimizer = the adapters' AdamW state, reference 0 (the base is the reference), the adapters in other"
        )
    return "\n".join(head + lines + tail)


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"
