"""Weight quantization as an attack on unlearning (Zhang et al., ICLR 2025, arXiv 2410.16454): quantize a model's
weights, dequantize them, and measure again. Forgetting that lives in differences smaller than the quantization
step is undone by it.

Every weight matrix is quantized as a Hugging Face checkpoint would be, row by row of its ``[out, in]`` tensor
(one scale per output channel, or per block of ``NF4_BLOCK`` inputs for NF4); vectors (norms, biases) stay in
full precision, as bitsandbytes and GPTQ leave them.

* ``int8`` / ``int4``: symmetric round-to-nearest per output channel, ``q = clip(round(w / s), -Q, Q)`` with
  ``s = max|w_row| / Q``, ``Q = 127`` or ``7``;
* ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): blocks of 64 weights scaled by their absmax, each
  weight mapped to the nearest of the 16 NF4 levels.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxunlearn.models import ModelConfig, family
from jaxunlearn.models.layouts import nested_get, read_block, to_hf_layout

# QLoRA's NF4 levels (the quantiles of N(0, 1) normalised to [-1, 1], with an exact zero; bitsandbytes' table).
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
NF4_BLOCK = 64
SCHEMES = ("int8", "int4", "nf4")


def round_to_nearest(rows: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-row round-to-nearest with ``bits`` bits, dequantized (``rows``: ``[out, in]``)."""
    q_max = 2 ** (bits - 1) - 1
    scale = np.abs(rows).max(axis=1, keepdims=True) / q_max
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(rows / scale), -q_max, q_max) * scale).astype(rows.dtype)


def normal_float4(rows: np.ndarray, block: int = NF4_BLOCK) -> np.ndarray:
    """NF4 with per-block absmax scaling along each row, dequantized (``rows``: ``[out, in]``; a row's last block
    may be shorter)."""
    out = np.empty_like(rows)
    for start in range(0, rows.shape[1], block):
        w = rows[:, start : start + block]
        absmax = np.abs(w).max(axis=1, keepdims=True)
        absmax = np.where(absmax > 0, absmax, 1.0)
        nearest = np.abs((w / absmax)[..., None] - NF4_LEVELS).argmin(axis=-1)
        out[:, start : start + block] = NF4_LEVELS[nearest] * absmax
    return out


def quantize_rows(rows: np.ndarray, scheme: str) -> np.ndarray:
    """``rows`` (a ``[out, in]`` weight) quantized with ``scheme`` and dequantized."""
    if scheme == "int8":
        return round_to_nearest(rows, 8)
    if scheme == "int4":
        return round_to_nearest(rows, 4)
    if scheme == "nf4":
        return normal_float4(rows)
    raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def _quantize_one(value: np.ndarray, layout, scheme: str) -> np.ndarray:
    """One (per-layer) parameter through its HF ``[out, in]`` tensor and back."""
    hf = to_hf_layout(layout, value)
    if hf.ndim != 2:  # norms and biases stay in full precision
        return value
    quantized = quantize_rows(hf.astype(np.float32), scheme).astype(value.dtype)
    full = tuple(slice(0, n) for n in value.shape)
    return read_block(layout, lambda index: quantized[index], value.shape, full)


def quantize_params(params: dict, config: ModelConfig, scheme: str) -> dict:
    """A copy of ``params`` with every weight matrix quantized with ``scheme`` and dequantized, on the same
    devices and shardings (computed on the host, one HF tensor at a time)."""
    out = jax.tree.map(lambda x: x, params)
    for entry in family(config).hf_tensors(config):
        *parents, leaf = entry.path
        holder = nested_get(out, tuple(parents))
        value = np.asarray(jax.device_get(holder[leaf]))
        if entry.stacked:
            quantized = np.stack([_quantize_one(value[i], entry.layout, scheme) for i in range(value.shape[0])])
        else:
            quantized = _quantize_one(value, entry.layout, scheme)
        holder[leaf] = jax.device_put(quantized, holder[leaf].sharding)
    return out
