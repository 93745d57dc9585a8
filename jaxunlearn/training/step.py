"""The optimizer and the jitted, sharded, donating train step with gradient accumulation.

State is a dict ``{"params", "opt_state", "step"}``. One call of the step consumes one optimizer step's worth
of data, ``[grad_accum_steps, micro_batch_size, length]`` per split, scanning over micro-batches so memory is
that of one micro-batch; gradients are averaged in fp32. A step whose loss or gradient norm is not finite
(or whose updated parameters are not finite) returns the *unchanged* state with ``finite=False``: the caller
stops, and nothing non-finite is ever checkpointed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxunlearn.errors import AT_LEAST_1, NON_NEGATIVE, POSITIVE, check_rules
from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import Method, get_method, method_hparams
from jaxunlearn.models import abstract_model, lora, param_shardings
from jaxunlearn.parallel import sharding

State = dict[str, Any]


def learning_rate_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``ceil(warmup_ratio * total_steps)`` steps, then cosine/linear/constant to 0.

    Matches HF Trainer: the first step runs at learning rate 0 whenever there is a warmup.
    """
    warmup = math.ceil(optim.warmup_ratio * total_steps)
    peak = optim.lr
    decay = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        tail = optax.cosine_decay_schedule(peak, decay)
    elif optim.schedule == "linear":
        tail = optax.linear_schedule(peak, 0.0, decay)
    else:
        tail = optax.constant_schedule(peak)
    if warmup == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), tail], [warmup])


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (with ``b1``, ``b2``, ``eps``, ``weight_decay``) after global-norm clipping."""
    schedule = learning_rate_schedule(optim, total_steps)
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return optax.chain(*parts), schedule


def state_shardings(tx: optax.GradientTransformation, params_shardings: dict, mesh: Mesh) -> State:
    """Shardings of the train state: optimizer moments follow their parameters; scalars are replicated."""
    replicated = NamedSharding(mesh, P())
    is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    abstract_params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((), jnp.float32), params_shardings, is_leaf=is_sharding
    )
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        params_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=is_sharding,
    )
    return {"params": params_shardings, "opt_state": opt, "step": replicated}


def init_state(params: dict, tx: optax.GradientTransformation, shardings: State) -> State:
    """A fresh state around ``params`` (which are kept, not copied)."""
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings["step"])()
    return {"params": params, "opt_state": opt_state, "step": step}


def batch_shardings(batch: Any, mesh: Mesh, rules: Any = None) -> Any:
    """``[accum, micro_batch, ...]`` arrays: the micro-batch axis over the ``batch`` logical axis's mesh axes."""

    def one(x: Any) -> NamedSharding:
        axes = (None, "batch") + ("length",) * (x.ndim - 2)
        return sharding.named_sharding(axes, sharding.normalize_rules(rules), mesh, x.shape)

    return jax.tree.map(one, batch)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array of ``tree`` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def passes_per_split(micro: dict[str, Any]) -> list[dict[str, Any]]:
    """One batch per split, the other splits left empty (zero rows).

    Every objective is a sum of per-split terms, each a mean over its own split's rows (a split with no rows
    contributes 0), so the gradients of these batches add up to the whole micro-batch's. Taken one after the
    other, each backward pass holds the activations of one split only: half the memory of a combined pass.
    """
    empty = {name: jax.tree.map(lambda x: x[:0], split) for name, split in micro.items()}
    return [{**empty, name: micro[name]} for name in micro]


def _add_pass(carry: tuple, out: tuple) -> tuple:
    """Add one forward/backward pass's ``((loss, metrics), grads)`` to the fp32 sums ``(grads, loss, metrics)``."""
    grads, loss_sum, metric_sums = carry
    (loss, metrics), g = out
    grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    return grads, loss_sum + loss, jax.tree.map(jnp.add, metric_sums, metrics)


def _loss_of_trainable(
    method: Method, ctx: Context, mask: Any, lora_spec: lora.LoraSpec | None = None, reference: bool = False
) -> Callable:
    """``loss_fn(params, ref_params, micro, rng) -> (loss, metrics)``, with no gradient through the parameters
    ``mask`` freezes (none computed at all).

    With LoRA (``lora_spec``), ``params`` are the adapters and ``ref_params`` the frozen base: the method sees the
    base with the adapters attached, and as its reference (``reference``) the base alone.
    """

    def loss_fn(params: dict, ref_params: Any, micro: Any, rng: jax.Array):
        if mask is not None:
            params = jax.tree.map(lambda p, m: p if np.any(m) else jax.lax.stop_gradient(p), params, mask)
        if lora_spec is not None:
            base = jax.lax.stop_gradient(ref_params)
            params, ref_params = lora.attach(base, params), (base if reference else None)
        return method.loss(params, ref_params, micro, rng, ctx)

    return loss_fn


def make_train_step(
    method: Method,
    ctx: Context,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    split_passes: bool = False,
    lora_spec: lora.LoraSpec | None = None,
    reference: bool = False,
) -> Callable:
    """``step(state, ref_params, batch) -> (state, metrics)`` (not yet jitted; see :func:`compile_train_step`).

    ``split_passes``: one forward/backward pass per split of each micro-batch (:func:`passes_per_split`), for less
    memory at the same FLOPs; by default the splits share one pass. ``lora_spec``: the state's params are LoRA
    adapters and ``ref_params`` the frozen base (the method's reference too when ``reference``).
    """

    mask = method.trainable(ctx.hparams, ctx.model.config) if method.trainable is not None else None
    if lora_spec is not None:
        mask = lora.adapter_mask(lora_spec, mask)
        ctx = dataclasses.replace(ctx, model=ctx.model.with_lora(lora_spec))
    loss_fn = _loss_of_trainable(method, ctx, mask, lora_spec, reference)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: State, ref_params: Any, batch: Any) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        step_rng = jax.random.fold_in(jax.random.key(ctx.seed), state["step"])
        accum = jax.tree.leaves(batch)[0].shape[0]
        micro0 = jax.tree.map(lambda x: x[0], batch)
        _, metric_shapes = jax.eval_shape(loss_fn, params, ref_params, micro0, step_rng)

        def accumulate(carry, xs):
            i, micro = xs
            rng = jax.random.fold_in(step_rng, i)
            passes = passes_per_split(micro) if split_passes and len(micro) > 1 else [micro]
            for n, part in enumerate(passes):
                # A later pass reads parameters that cross the barrier only together with the sums so far, so
                # the compiler cannot interleave the passes (and hold the activations of both at once).
                carry, p = jax.lax.optimization_barrier((carry, params)) if n else (carry, params)
                carry = _add_pass(carry, value_and_grad(p, ref_params, part, rng))
            return carry, None

        zeros = (
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes),
        )
        if accum == 1:  # no loop: a one-step scan would copy the gradients into and out of its carry
            (grads, loss_sum, metric_sums), _ = accumulate(zeros, (jnp.zeros((), jnp.int32), micro0))
        else:
            (grads, loss_sum, metric_sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), batch))
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
        if mask is not None:
            grads = _masked(grads, mask)
        loss = loss_sum / accum
        new_state, grad_norm, finite = _guarded_update(tx, state, grads, loss, mask)
        metrics = {k: v / accum for k, v in metric_sums.items()}
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite)
        return new_state, metrics

    return step


def _masked(tree: Any, mask: Any) -> Any:
    """``tree`` with the entries a parameter mask marks frozen (0.0) set to zero (:attr:`Method.trainable`)."""
    return jax.tree.map(lambda x, m: x * jnp.asarray(m, x.dtype), tree, mask)


def _guarded_update(
    tx: optax.GradientTransformation, state: State, grads: Any, loss: jax.Array, mask: Any = None
) -> tuple[State, jax.Array, jax.Array]:
    """``(new_state, grad_norm, finite)``: the optimizer step on ``grads``, or the unchanged ``state`` when the loss,
    the gradient norm or the updated parameters are not finite. With a parameter ``mask``, frozen entries get no
    update at all (weight decay included)."""
    params = state["params"]
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    if mask is not None:
        updates = _masked(updates, mask)
    new_params = optax.apply_updates(params, updates)
    # A finite loss and gradient can still give non-finite parameters (an infinite learning rate, an
    # overflowing moment): such a step is never applied, saved or exported.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, grad_norm, finite


def compile_train_step(
    step: Callable,
    shardings: State,
    ref_shardings: Any,
    batch_sharding: Any,
    mesh: Mesh,
    rules: sharding.Rules | None = None,
) -> Callable:
    """``jax.jit`` with explicit shardings; the state argument is donated.

    Activations are pinned by ``rules`` on ``mesh`` while the step is traced, so the compiled program is the
    same whoever calls it (a run, the planner, a benchmark).
    """

    def traced(state: State, ref_params: Any, batch: Any):
        with sharding.activation_sharding(mesh, rules):
            return step(state, ref_params, batch)

    return jax.jit(
        traced,
        in_shardings=(shardings, ref_shardings, batch_sharding),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


def reference_dtype(model_config: Any, reference_dtype_name: str = "") -> jnp.dtype:
    """The frozen reference model's storage dtype: ``model.reference_dtype``, else the master weights'."""
    return jnp.dtype(reference_dtype_name or model_config.param_dtype)


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The optimizer and every sharding of a run's train step: one builder for the run and the planner."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: State  # of the train state
    param_shardings: dict  # of the trained parameters (the adapters with LoRA)
    mesh: Mesh
    rules: sharding.Rules
    split_passes: bool = False  # config.train.split_passes
    lora: lora.LoraSpec | None = None  # config.lora: the state trains adapters over a frozen base
    base_shardings: dict | None = None  # of the model's parameters (the frozen base and the reference)

    @classmethod
    def for_run(cls, config: Any, model_config: Any, mesh: Mesh, total_steps: int) -> StepSetup:
        """From a run's config (``optim``, ``mesh.rules``, ``lora``) and architecture."""

        tx, schedule = make_optimizer(config.optim, total_steps)
        rules = sharding.normalize_rules(config.mesh.rules)
        base = param_shardings(model_config, mesh, rules)
        spec = lora_spec(config, model_config)
        params = base if spec is None else adapter_shardings(spec, model_config, mesh, rules)
        shardings = state_shardings(tx, params, mesh)
        return cls(tx, schedule, shardings, params, mesh, rules, config.train.split_passes, spec, base)

    def abstract_state(self, model_config: Any) -> State:
        """The train state as ``ShapeDtypeStruct``s with their shardings (to restore into, or to compile for)."""
        from flax import nnx

        if self.lora is None:
            _, params = nnx.split(abstract_model(model_config), nnx.Param)
            params = params.to_pure_dict()
        else:
            params = lora.adapter_shapes(self.lora, model_config.num_layers)
        shapes = jax.eval_shape(
            lambda p: {"params": p, "opt_state": self.tx.init(p), "step": jnp.zeros((), jnp.int32)}, params
        )
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.shardings)

    def initial_params(self, original: dict, seed: int) -> dict:
        """The trained parameters a run starts from: the original's, or with LoRA fresh adapters (PEFT's init)."""
        if self.lora is None:
            return original
        adapters = lora.init_adapters(self.lora, len(self.lora.targets[0].layers), seed)
        return jax.device_put(adapters, self.param_shardings)

    def compile(self, method: Method, ctx: Context, batch: Any, *, reference: bool) -> tuple[Callable, Any]:
        """The jitted step for ``batch``-shaped inputs (arrays or ``ShapeDtypeStruct``s) and its batch shardings;
        ``reference``: the step receives the frozen reference model (else ``None``). With LoRA the step always
        receives the frozen base, which is also the reference."""
        b_shardings = batch_shardings(batch, self.mesh, self.rules)
        frozen = self.lora is not None or reference
        ref_shardings = (self.base_shardings or self.param_shardings) if frozen else None
        step = make_train_step(
            method,
            ctx,
            self.tx,
            self.schedule,
            split_passes=self.split_passes,
            lora_spec=self.lora,
            reference=reference,
        )
        return compile_train_step(step, self.shardings, ref_shardings, b_shardings, self.mesh, self.rules), b_shardings


def lora_spec(config: Any, model_config: Any) -> lora.LoraSpec | None:
    """A run's LoRA adapters (None without): ``config.lora``, within the parameters its method trains."""
    method = get_method(config.method.name)
    trainable = None
    if method.trainable is not None and config.get("lora") and config.lora.rank:
        trainable = method.trainable(method_hparams(config.method), model_config)
    return lora.spec_for(config.get("lora"), model_config, trainable)


def adapter_shardings(spec: lora.LoraSpec, model_config: Any, mesh: Mesh, rules: sharding.Rules) -> dict:
    """``NamedSharding`` of every LoRA adapter array, by its logical axes (:func:`lora.adapter_axes`)."""
    shapes = lora.adapter_shapes(spec, model_config.num_layers)
    return jax.tree.map(
        lambda axes, s: sharding.named_sharding(axes, rules, mesh, s.shape),
        lora.adapter_axes(spec, model_config),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


SCHEDULES = ("cosine", "linear", "constant")


def check_optim_config(optim: Any) -> None:
    """The ``optim`` section: AdamW's and the schedule's settings."""
    check_rules(
        optim,
        "config.optim",
        {
            "lr": POSITIVE,
            "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "eps": POSITIVE,
            "weight_decay": (NON_NEGATIVE[0], "must be >= 0"),
            "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "schedule": (lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
            "clip_norm": (NON_NEGATIVE[0], ">= 0 (0 disables clipping)"),
        },
    )


def check_train_config(train: Any) -> None:
    """The ``train`` section: batching, length and logging of the train loop."""
    check_rules(
        train,
        "config.train",
        {
            "micro_batch_size": AT_LEAST_1,
            "grad_accum_steps": AT_LEAST_1,
            "epochs": AT_LEAST_1,
            "max_steps": (NON_NEGATIVE[0], ">= 0 (0 = use epochs)"),
            "logits_chunk_size": AT_LEAST_1,
            "log_every": AT_LEAST_1,
        },
    )
