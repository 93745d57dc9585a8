"""Rotary position embeddings (the "rotate half" layout Hugging Face checkpoints are stored in)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.models.spec import ModelConfig, check_rope_type


def rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """``(rope_theta, rope_scaling)`` of a ``config.json``, for :class:`ModelConfig`.

    Accepts both the transformers 4 (``rope_theta`` + ``rope_scaling``, with ``type`` or ``rope_type``) and 5
    (``rope_parameters``) forms; ``rope_scaling`` is None for plain RoPE, else the sorted scaling items.
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    merged = {**scaling, **params}
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.pop("type", None)
    rope_type = merged.get("rope_type", "default")
    check_rope_type(rope_type)
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, tuple(sorted(merged.items()))


def rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The RoPE keys of ``config.json``: transformers 5's ``rope_parameters`` and the 4.x keys kept in sync."""
    rope: dict[str, Any] = {"rope_type": "default"}
    if config.rope_scaling:
        rope = dict(config.rope_scaling)
    rope["rope_theta"] = config.rope_theta
    return {
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
    }


def rotary_dims(config: ModelConfig) -> int:
    """How many leading dimensions of each head RoPE rotates: ``head_dim x partial_rotary_factor``, truncated (as
    transformers computes it); all of them unless the config says otherwise (GPT-NeoX)."""
    return int(config.head_dim * config.partial_rotary_factor)


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies of the rotated dimensions, float32, with ``linear`` or ``llama3`` scaling
    applied."""
    dim = rotary_dims(config)
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(
        np.float32
    )
    if config.rope_scaling is None:
        return inv_freq
    params = dict(config.rope_scaling)
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` of shape ``[batch, length, heads, head_dim]`` by ``positions`` ``[batch, length]``.

    The first ``2 * len(inv_freq)`` dimensions are rotated (all of them unless the rotation is partial) and the
    rest pass through. Computed in float32 and cast back to ``x.dtype``.
    """
    rotated = 2 * inv_freq.shape[-1]
    if rotated < x.shape[-1]:  # partial rotary (GPT-NeoX): rotate_half within the leading dimensions only
        return jnp.concatenate([apply_rotary(x[..., :rotated], positions, inv_freq), x[..., rotated:]], axis=-1)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): rotate_half with cos/sin repeated over both halves.
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
