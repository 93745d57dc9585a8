"""The GPT-NeoX decoder in Flax NNX: EleutherAI's Pythia suite (trained on the public Pile) and GPT-NeoX-20B.

One file, top to bottom: LayerNorm, the fused query/key/value attention with partial rotary embeddings, the GELU
MLP, the decoder layer with its parallel (or sequential) residual, the model, its Hugging Face tensor table, and
the family. What GPT-NeoX shares with Llama is imported from the shared core (:mod:`jaxunlearn.models.transformer`), not copied: the
attention core (RoPE, masking, query blocking, the KV cache write and the fused kernel) is :class:`transformer.Attention`
with its own query/key/value projection, and the embedding, the scanned layer stack, remat, the KV cache and the
head are :class:`transformer.Transformer` with this file's layer and norm.

Differences from Llama, all as transformers' ``GPTNeoXForCausalLM`` computes them:

- LayerNorm with weight and bias (``layer_norm_eps``) instead of RMSNorm.
- One ``query_key_value`` weight whose output axis interleaves per head, ``[heads, (q, k, v), head_dim]``; it
  is kept fused here (``[embed, heads, 3, head_dim]``), so a shard of heads is a contiguous block of HF rows.
- RoPE on the first ``partial_rotary_factor`` (``rotary_pct``) of each head's dimensions only.
- ``use_parallel_residual``: ``x + attn(ln1(x)) + mlp(ln2(x))``; sequential ``x + attn(ln1(x))`` then
  ``+ mlp(ln2(.))`` otherwise.
- A two-matrix MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))`` with biases (``hidden_act``: exact GELU for Pythia).
- Attention biases with ``attention_bias``; an untied output head ``embed_out`` unless ``tie_word_embeddings``.

Every parameter carries logical axis names in its ``axes`` metadata (the ``q/k/v`` selector axis of the fused
projection is never split, so it has none) and activations are pinned by :func:`jaxunlearn.parallel.sharding.constrain`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxunlearn.models.transformer as transformer
from jaxunlearn.models.layouts import HFTensor, Layout
from jaxunlearn.models.precision import matmul_precision
from jaxunlearn.models.registry import Family, UnsupportedModelError, register_family, required
from jaxunlearn.models.rope import rope_from_hf, rope_to_hf
from jaxunlearn.models.spec import NO_WINDOW, ModelConfig
from jaxunlearn.models.transformer import ACTIVATION, KVCache, param
from jaxunlearn.parallel.sharding import constrain

Array = jax.Array

# transformers' ``hidden_act`` names -> the function (``gelu`` is exact; the others are its tanh approximation).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# GPT-NeoX's defaults when config.json does not say (transformers' GPTNeoXConfig).
DEFAULT_ROTARY_PCT = 0.25
DEFAULT_ROTARY_BASE = 10000.0


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias``, all in fp32 (as torch's LayerNorm), cast back to the
    compute dtype."""

    def __init__(self, config: ModelConfig):
        self.eps = config.layer_norm_eps
        self.scale = param(None, (config.hidden_size,), ("norm",), config, "ones")
        self.bias = param(None, (config.hidden_size,), ("norm",), config, "zeros")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Attention(transformer.Attention):
    """Multi-head attention with one fused ``[embed, heads, 3, head_dim]`` query/key/value projection.

    Only the projection differs from :class:`transformer.Attention`, whose ``__call__`` (partial RoPE, masks, KV cache,
    fused kernel, output projection and its bias) runs unchanged. GPT-NeoX has as many KV heads as heads.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, h, d = config.hidden_size, config.num_heads, config.head_dim
        self.qkv_proj = param(rngs, (e, h, 3, d), ("embed", "heads", None, "head_dim"), config, "normal")
        self.o_proj = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), config, "normal")
        if config.qkv_bias:
            self.qkv_bias = param(None, (h, 3, d), ("heads", None, "head_dim"), config, "zeros")
        if config.o_bias:
            self.o_bias = param(None, (e,), ("norm",), config, "zeros")

    def _project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """Queries, keys and values ``[batch, length, heads, head_dim]``: one matmul, split per head (so it needs no
        special case when the heads are split over devices)."""
        dt = x.dtype
        y = jnp.einsum("bte,ehjd->bthjd", x, self.qkv_proj[...].astype(dt), precision=matmul_precision(dt))
        if self.config.qkv_bias:
            y = y + self.qkv_bias[...].astype(dt)
        return y[:, :, :, 0], y[:, :, :, 1], y[:, :, :, 2]


class MLP(nnx.Module):
    """``down(act(up(x) + b_up)) + b_down`` (transformers' ``dense_h_to_4h`` and ``dense_4h_to_h``)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if config.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act={config.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        self.act = config.hidden_act
        e, m = config.hidden_size, config.intermediate_size
        self.up_proj = param(rngs, (e, m), ("embed", "mlp"), config, "normal")
        self.up_bias = param(None, (m,), ("mlp",), config, "zeros")
        self.down_proj = param(rngs, (m, e), ("mlp", "embed"), config, "normal")
        self.down_bias = param(None, (e,), ("norm",), config, "zeros")

    def __call__(self, x: Array) -> Array:
        dt, prec = x.dtype, matmul_precision(x.dtype)
        up = jnp.einsum("bte,em->btm", x, self.up_proj[...].astype(dt), precision=prec) + self.up_bias[...].astype(dt)
        hidden = constrain(ACTIVATIONS[self.act](up), ("batch", "length", "mlp"))
        y = jnp.einsum("btm,me->bte", hidden, self.down_proj[...].astype(dt), precision=prec)
        return y + self.down_bias[...].astype(dt)


class DecoderLayer(nnx.Module):
    """Pre-norm block with a parallel (``x + attn(ln1(x)) + mlp(ln2(x))``) or sequential residual; called as
    :class:`transformer.DecoderLayer` is, so :class:`transformer.Transformer` stacks and scans it."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.parallel = config.parallel_residual
        self.attn_norm = LayerNorm(config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = LayerNorm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: Array, positions: Array, key_positions: Array, key_valid: Array, window: Array, kv=None):
        y, new_kv = self.attn(self.attn_norm(x), positions, key_positions, key_valid, window, kv)
        if self.parallel:  # both branches read the layer's input
            x = x + y + self.mlp(self.mlp_norm(x))
        else:
            x = constrain(x + y, ACTIVATION)
            x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ACTIVATION), new_kv


class GPTNeoX(transformer.Transformer):
    """The GPT-NeoX causal LM: :class:`transformer.Transformer` (embedding, scanned layers, final norm, head, KV-cached
    ``hidden_states``, ``upto``) with GPT-NeoX's layer and a LayerNorm as the final norm."""

    layer_class = DecoderLayer
    norm_class = LayerNorm


# --- Hugging Face tensor names ---------------------------------------------------------------------------


class _FusedQKV(Layout):
    """``[embed, heads, 3, head_dim]`` <-> HF ``query_key_value.weight`` ``[heads*3*head_dim, embed]`` (rows
    ordered head, then q/k/v, then head_dim)."""

    name = "neox_qkv"

    def hf_shape(self, shape):
        e, h, three, d = shape
        return (h * three * d, e)

    def to_hf(self, value):
        return value.transpose(1, 2, 3, 0).reshape(-1, value.shape[0])

    def read_block(self, read, shape, block):
        e, h, j, dd = block
        per_head = shape[2] * shape[3]
        rows = read((slice(h.start * per_head, h.stop * per_head), e))
        rows = rows.reshape(h.stop - h.start, shape[2], shape[3], e.stop - e.start)
        return rows[:, j, dd, :].transpose(3, 0, 1, 2)


class _FusedQKVBias(Layout):
    """``[heads, 3, head_dim]`` <-> HF ``query_key_value.bias`` ``[heads*3*head_dim]``."""

    name = "neox_qkv_bias"

    def hf_shape(self, shape):
        return (int(np.prod(shape)),)

    def to_hf(self, value):
        return value.reshape(-1)

    def read_block(self, read, shape, block):
        h, j, dd = block
        per_head = shape[1] * shape[2]
        rows = read((slice(h.start * per_head, h.stop * per_head),))
        return rows.reshape(h.stop - h.start, shape[1], shape[2])[:, j, dd]


FUSED_QKV, FUSED_QKV_BIAS = _FusedQKV(), _FusedQKVBias()


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """The complete parameter <-> HF tensor table for ``config``."""
    layer = "gpt_neox.layers.{layer}."
    table = [HFTensor(("embedding",), "gpt_neox.embed_in.weight")]
    for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
        table.append(HFTensor(("layers", ours, "scale"), layer + f"{theirs}.weight"))
        table.append(HFTensor(("layers", ours, "bias"), layer + f"{theirs}.bias"))
    table.append(HFTensor(("layers", "attn", "qkv_proj"), layer + "attention.query_key_value.weight", FUSED_QKV))
    if config.qkv_bias:
        table.append(HFTensor(("layers", "attn", "qkv_bias"), layer + "attention.query_key_value.bias", FUSED_QKV_BIAS))
    table.append(HFTensor(("layers", "attn", "o_proj"), layer + "attention.dense.weight", "heads_out"))
    if config.o_bias:
        table.append(HFTensor(("layers", "attn", "o_bias"), layer + "attention.dense.bias"))
    for ours, theirs in (("up", "dense_h_to_4h"), ("down", "dense_4h_to_h")):
        table.append(HFTensor(("layers", "mlp", f"{ours}_proj"), layer + f"mlp.{theirs}.weight", "transpose"))
        table.append(HFTensor(("layers", "mlp", f"{ours}_bias"), layer + f"mlp.{theirs}.bias"))
    table.append(HFTensor(("final_norm", "scale"), "gpt_neox.final_layer_norm.weight"))
    table.append(HFTensor(("final_norm", "bias"), "gpt_neox.final_layer_norm.bias"))
    if not config.tie_word_embeddings:
        # Pythia checkpoints and transformers 5's save_pretrained both name the head embed_out.
        table.append(HFTensor(("lm_head",), "embed_out.weight", "transpose"))
    return table


# Buffers old checkpoints saved next to the weights (the causal mask, its fill value, RoPE frequencies); they are
# recomputed. ``attention.bias`` is the mask buffer, not ``attention.query_key_value.bias``.
_IGNORABLE = re.compile(
    r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|gpt_neox\.rotary_emb\.inv_freq"
)


# --- the family --------------------------------------------------------------------------------------------


def _rotary_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_theta``/``rope_scaling``/``partial_rotary_factor`` as transformers 5's GPTNeoXConfig reads them:
    ``rope_scaling`` or ``rope_parameters`` first, then the legacy ``rotary_emb_base``/``rotary_pct`` (top-level
    ``rope_theta``/``partial_rotary_factor`` keys are ignored, as there), then 10000 and 0.25."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    factor = params.pop("partial_rotary_factor", hf.get("rotary_pct", DEFAULT_ROTARY_PCT))
    if params.get("rope_theta") is None:
        base = hf.get("rotary_emb_base")
        params["rope_theta"] = DEFAULT_ROTARY_BASE if base is None else base
    theta, scaling = rope_from_hf(
        {"rope_parameters": params, "max_position_embeddings": hf.get("max_position_embeddings", 2048)}
    )
    return dict(rope_theta=float(theta), rope_scaling=scaling, partial_rotary_factor=float(factor))


@register_family
class GPTNeoXFamily(Family):
    """GPT-NeoX and Pythia: LayerNorm, fused per-head q/k/v, partial RoPE, (parallel) residual, GELU MLP."""

    model_type = "gpt_neox"
    architecture = "GPTNeoXForCausalLM"

    def config_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        heads, hidden, layers = (required(hf, k) for k in ("num_attention_heads", "hidden_size", "num_hidden_layers"))
        if hidden % heads:
            raise UnsupportedModelError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        rotary = _rotary_from_hf(hf)
        head_dim = hidden // heads
        rotated = int(head_dim * rotary["partial_rotary_factor"])
        if not 0.0 <= rotary["partial_rotary_factor"] <= 1.0 or rotated % 2:
            raise UnsupportedModelError(
                f"rotary_pct (partial_rotary_factor)={rotary['partial_rotary_factor']} rotates {rotated} of "
                f"head_dim={head_dim} dimensions; only an even number between 0 and head_dim is supported"
            )
        attention_bias = bool(hf.get("attention_bias", True))
        return dict(
            model_type=self.model_type,
            vocab_size=required(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=required(hf, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            hidden_act=act,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=True,
            sliding_windows=(NO_WINDOW,) * layers,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            **rotary,
        )

    def config_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        rope = rope_to_hf(config)
        rope["rope_parameters"]["partial_rotary_factor"] = config.partial_rotary_factor
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "hidden_act": config.hidden_act,
            "layer_norm_eps": config.layer_norm_eps,
            "use_parallel_residual": config.parallel_residual,
            "attention_bias": config.qkv_bias,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "initializer_range": config.initializer_range,
            # transformers 5 reads rope_parameters (or rope_scaling when set); 4.x rotary_emb_base and rotary_pct.
            "rope_parameters": rope["rope_parameters"],
            "rope_scaling": rope["rope_scaling"],
            "rotary_emb_base": config.rope_theta,
            "rotary_pct": config.partial_rotary_factor,
        }

    def num_params(self, config: ModelConfig) -> int:
        e, m, hd = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
        attn = 3 * e * hd + hd * e + (3 * hd + e) * config.qkv_bias
        mlp = 2 * e * m + m + e
        per_layer = attn + mlp + 4 * e  # two LayerNorms with weight and bias
        head = 0 if config.tie_word_embeddings else e * config.vocab_size
        return config.vocab_size * e + config.num_layers * per_layer + 2 * e + head

    def hf_tensors(self, config: ModelConfig) -> list[HFTensor]:
        return hf_tensors(config)

    def ignored_hf_tensor(self, config: ModelConfig, name: str) -> bool:
        tied_head = config.tie_word_embeddings and name in ("embed_out.weight", "lm_head.weight")
        return bool(_IGNORABLE.fullmatch(name)) or tied_head

    def module(self, config: ModelConfig, *, rngs: nnx.Rngs) -> GPTNeoX:
        return GPTNeoX(config, rngs=rngs)

    def init_cache(self, config: ModelConfig, batch: int, slots: int, dtype: Any = None) -> KVCache:
        return KVCache.empty(config, batch, slots, dtype)
