"""The Llama-family decoder in Flax NNX: Llama 2/3 (Yi, TinyLlama, SmolLM), Mistral and Qwen2.

One file, top to bottom: RMSNorm, attention (GQA/MQA, RoPE, causal + sliding-window + padding mask), SwiGLU
MLP, the decoder layer, the stacked-and-scanned decoder, and the table that maps each parameter to its Hugging
Face tensor. The three families differ only in configuration (biases, tied embeddings, sliding windows, RoPE
scaling), read from ``config.json`` by :class:`~jaxunlearn.models.config.ModelConfig`.

Every parameter carries logical axis names in its ``axes`` metadata and every large activation is pinned by
logical names through :func:`jaxunlearn.sharding.constrain`; mesh axes never appear here.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models.config import NO_WINDOW, ModelConfig
from jaxunlearn.models.rope import apply_rotary, inverse_frequencies
from jaxunlearn.sharding import constrain

Array = jax.Array

ACTIVATION = ("batch", "length", "embed")
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
    """Keys/values of every layer for incremental decoding.

    ``k``/``v`` are ``[layers, batch, slots, kv_heads, head_dim]``; ``positions`` ``[batch, slots]`` is the
    position of the token in each slot and ``valid`` marks filled, non-padding slots; new tokens are written
    at ``index``. Slots are independent of positions, so left-padded prompts work.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, slots: int, dtype=None) -> KVCache:
        shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.dtype
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.zeros((batch, slots), jnp.int32),
            valid=jnp.zeros((batch, slots), bool),
            index=jnp.zeros((), jnp.int32),
        )


def _precision(dtype: jnp.dtype) -> jax.lax.Precision:
    # fp32 compute means fp32 matmuls, also on TPU/GPU where the default would silently use bf16/TF32 passes.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], config: ModelConfig, init: str
) -> nnx.Param:
    dtype = jnp.dtype(config.param_dtype)
    if init == "normal":
        value = config.initializer_range * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale``, normalised in fp32 and scaled in the compute dtype (as transformers does)."""

    def __init__(self, config: ModelConfig):
        self.eps = config.rms_norm_eps
        self.scale = _param(None, (config.hidden_size,), ("norm",), config, "ones")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when there is one KV head)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), config, "normal")
        self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config, "normal")
        self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config, "normal")
        self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), config, "normal")
        if config.qkv_bias:
            self.q_bias = _param(None, (h, d), ("heads", "head_dim"), config, "zeros")
            self.k_bias = _param(None, (k, d), ("kv_heads", "head_dim"), config, "zeros")
            self.v_bias = _param(None, (k, d), ("kv_heads", "head_dim"), config, "zeros")
        if config.o_bias:
            self.o_bias = _param(None, (e,), ("norm",), config, "zeros")

    def _project(self, x: Array, name: str) -> Array:
        dt = x.dtype
        y = jnp.einsum("bte,ehd->bthd", x, getattr(self, f"{name}_proj")[...].astype(dt), precision=_precision(dt))
        if self.config.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(dt)
        return y

    def __call__(
        self,
        x: Array,
        positions: Array,
        key_positions: Array,
        key_valid: Array,
        window: Array,
        kv: tuple[Array, Array, Array] | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Self-attention over ``x``. With ``kv = (k_cache, v_cache, index)`` the new keys/values are written
        into the cache at ``index`` and the queries attend over every cache slot (``key_positions`` and
        ``key_valid`` then describe the slots). Returns the output and the updated ``(k_cache, v_cache)``."""
        cfg, dt = self.config, x.dtype
        inv_freq = inverse_frequencies(cfg)
        q = apply_rotary(self._project(x, "q"), positions, inv_freq)
        k = apply_rotary(self._project(x, "k"), positions, inv_freq)
        v = self._project(x, "v")
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        new_kv = None
        if kv is not None:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            new_kv = (k, v)
            out = dot_product_attention(q, k.astype(dt), v.astype(dt), positions, key_positions, key_valid, window)
        elif cfg.attention_impl == "dot_product_attention":
            out = _fused_attention(q, k, v, cfg)
        else:
            out = dot_product_attention(q, k, v, positions, key_positions, key_valid, window)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = jnp.einsum("bthd,hde->bte", out, self.o_proj[...].astype(dt), precision=_precision(dt))
        if cfg.o_bias:
            y = y + self.o_bias[...].astype(dt)
        return y, new_kv


def dot_product_attention(
    q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, key_valid: Array, window: Array
) -> Array:
    """Masked softmax attention. ``q`` ``[B,T,H,D]``, ``k``/``v`` ``[B,S,K,D]`` with ``H`` a multiple of ``K``.

    A query at position ``i`` sees keys at positions ``j`` with ``i - window < j <= i`` that are not padding.
    Scores and softmax are fp32. Grouped KV heads are repeated to the query heads first: the plain 4-D
    layout is several times faster on CPU than a grouped 5-D einsum, and the copy is small next to the scores.
    """
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32, precision=_precision(q.dtype)) * (
        d**-0.5
    )
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    mask = (delta >= 0) & (delta < window) & key_valid[:, None, :]
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v, precision=_precision(q.dtype))


def _fused_attention(q: Array, k: Array, v: Array, config: ModelConfig) -> Array:
    # jax.nn.dot_product_attention picks cuDNN flash attention on GPUs. Right padding needs no key mask here:
    # with a causal mask a real (non-pad) query never sees a pad key, and pad queries are ignored by losses.
    window = config.sliding_windows[0]
    local = None if window == NO_WINDOW else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, m = config.hidden_size, config.intermediate_size
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), config, "normal")
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), config, "normal")
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), config, "normal")
        if config.mlp_bias:
            self.gate_bias = _param(None, (m,), ("mlp",), config, "zeros")
            self.up_bias = _param(None, (m,), ("mlp",), config, "zeros")
            self.down_bias = _param(None, (e,), ("norm",), config, "zeros")

    def __call__(self, x: Array) -> Array:
        dt, prec = x.dtype, _precision(x.dtype)
        gate = jnp.einsum("bte,em->btm", x, self.gate_proj[...].astype(dt), precision=prec)
        up = jnp.einsum("bte,em->btm", x, self.up_proj[...].astype(dt), precision=prec)
        if self.config.mlp_bias:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        y = jnp.einsum("btm,me->bte", hidden, self.down_proj[...].astype(dt), precision=prec)
        if self.config.mlp_bias:
            y = y + self.down_bias[...].astype(dt)
        return y


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: Array, positions: Array, key_positions: Array, key_valid: Array, window: Array, kv=None):
        y, new_kv = self.attn(self.attn_norm(x), positions, key_positions, key_valid, window, kv)
        x = constrain(x + y, ACTIVATION)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ACTIVATION), new_kv


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """``num_layers`` decoder layers as one module whose parameters have a leading ``layers`` axis."""
    keys = jax.random.split(rngs.params(), config.num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(config, rngs=nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(DecoderLayer(config, rngs=nnx.Rngs(key))))(keys)
    layers = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable):
            node.set_metadata(axes=("layers", *node.get_metadata()["axes"]))
    return layers


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only causal LM. ``model(tokens, attention_mask)`` returns fp32 logits ``[batch, length, vocab]``.

    Layers are stacked and run with ``jax.lax.scan`` so compile time does not grow with depth; ``config.remat``
    chooses what the backward pass recomputes. Inputs are right-padded token ids with a 1/0 attention mask.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, v = config.hidden_size, config.vocab_size
        self.embedding = _param(rngs, (v, e), ("vocab", "embed"), config, "normal")
        self.layers = _stacked_layers(config, rngs)
        self.final_norm = RMSNorm(config)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (e, v), ("embed", "vocab"), config, "normal")

    def __call__(
        self,
        tokens: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        *,
        return_hidden: bool = False,
    ) -> Array | tuple[Array, Array]:
        hidden = self.hidden_states(tokens, attention_mask, positions)
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(
        self,
        tokens: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Final-norm hidden states ``[batch, length, embed]`` in the compute dtype.

        With a ``cache``, ``tokens`` are appended to it (their keys/values written at ``cache.index``), queries
        attend over every cached slot, and ``(hidden, new_cache)`` is returned.
        """
        cfg = self.config
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(cfg.dtype)
        x = constrain(x, ACTIVATION)

        graphdef, state = nnx.split(self.layers)
        windows = jnp.asarray(cfg.sliding_windows, jnp.int32)
        if cache is None:
            key_positions, key_valid = positions, valid
        else:
            key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))

        def layer_step(x: Array, scanned: tuple) -> tuple[Array, tuple | None]:
            layer_state, window, *kv = scanned
            kv = (kv[0], kv[1], cache.index) if kv else None
            return nnx.merge(graphdef, layer_state)(x, positions, key_positions, key_valid, window, kv)

        if cfg.remat != "none":
            layer_step = jax.checkpoint(layer_step, policy=_REMAT[cfg.remat], prevent_cse=False)
        scanned = (state, windows) if cache is None else (state, windows, cache.k, cache.v)
        x, new_kv = jax.lax.scan(layer_step, x, scanned)
        hidden = self.final_norm(x)
        if cache is None:
            return hidden
        k, v = (constrain(a, CACHE_AXES) for a in new_kv)
        return hidden, KVCache(k, v, key_positions, key_valid, cache.index + t)

    def head_kernel(self) -> Array:
        """The output projection as ``[embed, vocab]`` (the transposed embedding when tied)."""
        return self.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: Array) -> Array:
        """Project hidden states to fp32 vocabulary logits (accumulated in fp32)."""
        w = self.head_kernel().astype(hidden.dtype)
        out = jnp.einsum(
            "bte,ev->btv", hidden, w, preferred_element_type=jnp.float32, precision=_precision(hidden.dtype)
        )
        return constrain(out, ("batch", "length", "vocab"))


# --- Hugging Face tensor names ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one jaxunlearn parameter lives in a Hugging Face checkpoint.

    ``layout`` says how the HF tensor is rearranged: ``same``; ``transpose`` (HF ``[out, in]`` linear ->
    ``[in, out]``); ``heads_in`` (``[heads*head_dim, embed]`` -> ``[embed, heads, head_dim]``); ``heads_out``
    (``[embed, heads*head_dim]`` -> ``[heads, head_dim, embed]``); ``heads_bias`` (``[heads*head_dim]`` ->
    ``[heads, head_dim]``). ``name`` contains ``{layer}`` for stacked per-layer parameters.
    """

    path: tuple[str, ...]
    name: str
    layout: str = "same"

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.name


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """The complete parameter <-> HF tensor table for ``config`` (biases and head included as configured)."""
    layer = "model.layers.{layer}."
    table = [
        HFTensor(("embedding",), "model.embed_tokens.weight"),
        HFTensor(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight"),
        HFTensor(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight"),
    ]
    for n in "qkv":
        table.append(HFTensor(("layers", "attn", f"{n}_proj"), layer + f"self_attn.{n}_proj.weight", "heads_in"))
        if config.qkv_bias:
            table.append(HFTensor(("layers", "attn", f"{n}_bias"), layer + f"self_attn.{n}_proj.bias", "heads_bias"))
    table.append(HFTensor(("layers", "attn", "o_proj"), layer + "self_attn.o_proj.weight", "heads_out"))
    if config.o_bias:
        table.append(HFTensor(("layers", "attn", "o_bias"), layer + "self_attn.o_proj.bias"))
    for n in ("gate", "up", "down"):
        table.append(HFTensor(("layers", "mlp", f"{n}_proj"), layer + f"mlp.{n}_proj.weight", "transpose"))
        if config.mlp_bias:
            table.append(HFTensor(("layers", "mlp", f"{n}_bias"), layer + f"mlp.{n}_proj.bias"))
    table.append(HFTensor(("final_norm", "scale"), "model.norm.weight"))
    if not config.tie_word_embeddings:
        table.append(HFTensor(("lm_head",), "lm_head.weight", "transpose"))
    return table
