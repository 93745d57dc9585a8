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
from jaxunlearn.methods.registry import Array, register
from jaxunlearn.models import abstract_model, family, losses
from jaxunlearn.models.layouts import nested_get

# --- RMU: steer one layer's activations, train a few parameters -----------------------------------------------

# Stream id folded into the run seed for RMU's random direction.
_RMU_STREAM = 0x7E0


def control_vector(hidden_size: int, seed: int, steering_coeff: float) -> Array:
    """RMU's target activation ``c u``: ``u`` uniform in ``[0, 1)^d`` and normalised (the official ``torch.rand``
    direction, in the positive orthant), fixed for the run by its seed, ``c`` the steering coefficient."""
    u = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), _RMU_STREAM), (hidden_size,), jnp.float32)
    return steering_coeff * u / jnp.linalg.norm(u)


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


@register(
    "rmu",
    needs=retain_needs(reference=True),
    trainable=_rmu_trainable,
    check=_rmu_check,
    layer=7,
    trainable_params=r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight",
    steering_coeff=20.0,
    forget_weight=1.0,
    retain_weight=100.0,
)
def representation_misdirection(params, ref_params, batch, rng, ctx: Context):
    """RMU (Li et al. 2024, arXiv 2403.03218): push the residual stream after decoder layer ``layer`` on forget
    chunks to ``steering_coeff x u`` (a fixed random unit vector, :func:`control_vector`) and keep it equal to the
    frozen original's on retain chunks (weight ``retain_weight``, the paper's alpha), both as
    :func:`activation_mse`; only the parameters ``trainable_params`` selects are updated (official defaults: the
    MLP down-projections of layers 5-7, loss at layer 7). Only the layers up to ``layer`` run."""
    upto = ctx.hparams["layer"] + 1
    names = ("forget", "retain") if ctx.hparams["retain_weight"] else ("forget",)
    splits = [ctx.split(batch, name) for name in names]
    activations = dict(zip(names, ctx.hidden(params, *splits, upto=upto)))
    forget = splits[0]
    control = control_vector(ctx.model.config.hidden_size, ctx.seed, ctx.hparams["steering_coeff"])
    positions = scored_positions(forget, shift=0)
    term = mean_over_sequences(activation_mse(activations["forget"], control, positions), positions.any(-1))
    loss = ctx.hparams["forget_weight"] * term

    def retain_term() -> Array:
        retain = ctx.split(batch, "retain")
        frozen = jax.lax.stop_gradient(ctx.forward(ref_params, retain, upto=upto))
        positions = scored_positions(retain, shift=0)
        return mean_over_sequences(activation_mse(activations["retain"], frozen, positions), positions.any(-1))

    return with_retain_term(loss, {"rmu_forget": term}, "rmu_retain", retain_term, ctx)
