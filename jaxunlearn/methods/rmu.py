"""RMU (Li et al. 2024, WMDP): steer one layer's activations on forget text to a random direction, keep them on
retain text, and train a few parameters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.methods.context import Context, mean_over_sequences, scored_positions
from jaxunlearn.methods.paper import retain_needs, with_retain_term
from jaxunlearn.methods.registry import Array, Needs, register
from jaxunlearn.models import abstract_model, family, losses
from jaxunlearn.models.layouts import nested_get

# --- RMU: steer one layer's activations, train a few parameters -----------------------------------------------

# Stream id folded into the run seed for RMU's random direction.
_RMU_STREAM = 0x7E0


def control_vector(hidden_size: int, seed: int, steering_coeff: float, topic: int = 0) -> Array:
    """RMU's target activation ``c u``: ``u`` uniform in ``[0, 1)^d`` and normalised (the official ``torch.rand``
    direction, in the positive orthant), fixed for the run by its seed, ``c`` the steering coefficient; one
    direction per forget topic (the official script draws one per corpus)."""
    key = jax.random.fold_in(jax.random.key(seed), _RMU_STREAM)
    if topic:
        key = jax.random.fold_in(key, topic)
    u = jax.random.uniform(key, (hidden_size,), jnp.float32)
    return steering_coeff * u / jnp.linalg.norm(u)


def per_topic(split: Mapping[str, Array], hp: Mapping[str, Any], name: str) -> Array:
    """``[rows]`` float32: hyper-parameter ``name`` for each row's forget topic, ``hp[name]`` for topic 0 and
    ``hp[name + "2"]`` (0: the same) for topic 1 (``data.forget2``); rows without a ``topic`` are topic 0."""
    first, second = hp[name], hp[name + "2"] or hp[name]
    topic = split.get("topic", jnp.zeros(split["tokens"].shape[:1], jnp.int32))
    return jnp.where(topic == 1, second, first).astype(jnp.float32)


def activation_mse(activations: Array, target: Array, mask: Array) -> Array:
    """Per-sequence ``[batch]`` mean over non-padding positions of the mean over the hidden dimension of the
    squared difference (open-unlearning's masked RMU loss; the official code averages over padding too)."""
    squared = jnp.mean(jnp.square(activations.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return losses.sequence_mean(squared, mask)


def parameter_mask(model_config: Any, pattern: str) -> dict:
    """1.0 for the parameters whose Hugging Face tensor name fully matches the regular expression ``pattern``, else
    0.0, per layer for stacked parameters: a tree shaped like the params, leaves ``[layers, 1, ...]`` or scalars."""
    from flax import nnx

    regex = re.compile(pattern)
    _, abstract = nnx.split(abstract_model(model_config), nnx.Param)
    shapes = abstract.to_pure_dict()
    mask: dict = {}
    for entry in family(model_config).hf_tensors(model_config):
        ndim = len(nested_get(shapes, entry.path).shape)
        if entry.stacked:
            layers = [regex.fullmatch(entry.name.format(layer=i)) is not None for i in range(model_config.num_layers)]
            value = np.asarray(layers, np.float32).reshape(-1, *([1] * (ndim - 1)))
        else:
            value = np.float32(regex.fullmatch(entry.name) is not None)
        parent = mask
        for key in entry.path[:-1]:
            parent = parent.setdefault(key, {})
        parent[entry.path[-1]] = value
    return mask


def _rmu_trainable(hp: Mapping[str, Any], model_config: Any) -> dict:
    return parameter_mask(model_config, hp["trainable_params"])


def _rmu_check(hp: Mapping[str, Any], model_config: Any) -> None:
    """The steered layer exists; ``trainable_params`` is a regular expression that selects a parameter the loss
    reaches (the embedding, or one in a layer up to the steered one: the forward pass stops there)."""

    layer, layers, pattern = hp["layer"], model_config.num_layers, hp["trainable_params"]
    if layer >= layers:
        raise ValueError(f"config.method.layer={layer}: the model has layers 0 to {layers - 1}")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"config.method.trainable_params={pattern!r}: not a regular expression ({e})") from None
    reached = []
    for entry in family(model_config).hf_tensors(model_config):
        if entry.stacked:
            reached += [entry.name.format(layer=i) for i in range(layer + 1)]
        elif entry.path == ("embedding",):
            reached.append(entry.name)
    if not any(regex.fullmatch(name) for name in reached):
        raise ValueError(
            f"config.method.trainable_params={pattern!r}: matches no parameter in layers 0 to {layer} (the "
            "Hugging Face tensor names, e.g. model.layers.0.mlp.down_proj.weight)"
        )


def _rmu_needs(hp: Mapping[str, Any]) -> Needs:
    """Retain chunks and the frozen original's forward on them when either topic's alpha is > 0."""
    return retain_needs(reference=True)({**hp, "retain_weight": max(hp["retain_weight"], hp["retain_weight2"])})


def _controls(forget: Mapping[str, Array], ctx: Context) -> Array:
    """The target of each forget row: ``c u`` (one run-wide vector), or with topics (``data.forget2``) each row's
    topic's own ``[rows, 1, hidden]``."""
    hp, size = ctx.hparams, ctx.model.config.hidden_size
    if "topic" not in forget:
        return control_vector(size, ctx.seed, hp["steering_coeff"])
    directions = jnp.stack([control_vector(size, ctx.seed, 1.0, topic=t) for t in (0, 1)])
    return (per_topic(forget, hp, "steering_coeff")[:, None] * directions[forget["topic"]])[:, None, :]


@register(
    "rmu",
    needs=_rmu_needs,
    trainable=_rmu_trainable,
    check=_rmu_check,
    topics=True,
    layer=7,
    trainable_params=r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight",
    steering_coeff=20.0,
    forget_weight=1.0,
    retain_weight=100.0,
    # The second forget topic's (data.forget2; the official --steering_coeffs and --alpha take one per corpus):
    # 0 = the first topic's.
    steering_coeff2=0.0,
    retain_weight2=0.0,
)
def representation_misdirection(params, ref_params, batch, rng, ctx: Context):
    """RMU (Li et al. 2024, arXiv 2403.03218): push the residual stream after decoder layer ``layer`` on forget
    chunks to ``steering_coeff x u`` (a fixed random unit vector, :func:`control_vector`) and keep it equal to the
    frozen original's on retain chunks (weight ``retain_weight``, the paper's alpha), both as
    :func:`activation_mse`; only the parameters ``trainable_params`` selects are updated (official defaults: the
    MLP down-projections of layers 5-7, loss at layer 7). Only the layers up to ``layer`` run. With two forget
    topics (``data.forget2``) each has its own direction, coefficient and alpha (``steering_coeff2``,
    ``retain_weight2``), picked by the batch's ``topic``."""
    hp = ctx.hparams
    upto = hp["layer"] + 1
    names = ("forget", "retain") if hp["retain_weight"] or hp["retain_weight2"] else ("forget",)
    splits = [ctx.split(batch, name) for name in names]
    activations = dict(zip(names, ctx.hidden(params, *splits, upto=upto)))
    forget = splits[0]
    positions = scored_positions(forget, shift=0)
    term = mean_over_sequences(
        activation_mse(activations["forget"], _controls(forget, ctx), positions), positions.any(-1)
    )
    loss = hp["forget_weight"] * term

    def retain_rows() -> tuple[Array, Array]:
        retain = ctx.split(batch, "retain")
        frozen = jax.lax.stop_gradient(ctx.forward(ref_params, retain, upto=upto))
        positions = scored_positions(retain, shift=0)
        return activation_mse(activations["retain"], frozen, positions), positions.any(-1)

    if "topic" not in forget:
        return with_retain_term(
            loss, {"rmu_forget": term}, "rmu_retain", lambda: mean_over_sequences(*retain_rows()), ctx
        )
    if "retain" not in names:
        return loss, {"rmu_forget": term}
    rows, valid = retain_rows()
    alphas = per_topic(ctx.split(batch, "retain"), hp, "retain_weight")
    retain_term = mean_over_sequences(rows, valid)
    return loss + mean_over_sequences(alphas * rows, valid), {"rmu_forget": term, "rmu_retain": retain_term}
