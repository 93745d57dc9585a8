"""The shared decoder core in Flax NNX: parameters with logical axes, RMSNorm, attention (GQA/MQA, RoPE, causal +
sliding-window + padding mask, query blocking, the KV cache), the SwiGLU MLP, the decoder layer and the stacked,
scanned decoder with its head (:class:`Transformer`).

Model families (:mod:`jaxunlearn.models.llama`, :mod:`jaxunlearn.models.gpt_neox`) say what their checkpoints'
``config.json`` means and which parameters they hold; GPT-NeoX swaps in its own layer, norm and projections.
Every parameter carries logical axis names in its ``axes`` metadata and every large activation is pinned by
logical names through :func:`jaxunlearn.parallel.sharding.constrain`; mesh axes never appear here.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models.lora import merge_layer as lora_merge_layer
from jaxunlearn.models.precision import matmul_precision
from jaxunlearn.models.rope import apply_rotary, inverse_frequencies
from jaxunlearn.models.spec import NO_WINDOW, ModelConfig
from jaxunlearn.parallel import sharding
from jaxunlearn.parallel.sharding import constrain

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


def param(
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
        self.scale = param(None, (config.hidden_size,), ("norm",), config, "ones")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when there is one KV head)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), config, "normal")
        self.k_proj = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config, "normal")
        self.v_proj = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config, "normal")
        self.o_proj = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), config, "normal")
        if config.qkv_bias:
            self.q_bias = param(None, (h, d), ("heads", "head_dim"), config, "zeros")
            self.k_bias = param(None, (k, d), ("kv_heads", "head_dim"), config, "zeros")
            self.v_bias = param(None, (k, d), ("kv_heads", "head_dim"), config, "zeros")
        if config.o_bias:
            self.o_bias = param(None, (e,), ("norm",), config, "zeros")

    def _project(self, x: Array, name: str) -> Array:
        dt = x.dtype
        y = jnp.einsum(
            "bte,ehd->bthd", x, getattr(self, f"{name}_proj")[...].astype(dt), precision=matmul_precision(dt)
        )
        if self.config.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(dt)
        return y

    def _project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """Queries, keys and values. Unless the heads are split over devices, as one matmul with the three weights
        side by side: one wide matmul runs much faster than three narrow ones (on CPU about twice)."""
        if sharding.is_split("heads") or sharding.is_split("kv_heads"):
            return self._project(x, "q"), self._project(x, "k"), self._project(x, "v")
        cfg, dt = self.config, x.dtype
        e, d = cfg.hidden_size, cfg.head_dim
        w = jnp.concatenate([getattr(self, f"{n}_proj")[...].reshape(e, -1) for n in "qkv"], axis=1).astype(dt)
        y = jnp.einsum("bte,ef->btf", x, w, precision=matmul_precision(dt))
        q, k, v = jnp.split(y, [cfg.num_heads * d, (cfg.num_heads + cfg.num_kv_heads) * d], axis=-1)
        q, k, v = (a.reshape(*a.shape[:2], -1, d) for a in (q, k, v))
        if cfg.qkv_bias:
            q, k, v = (a + getattr(self, f"{n}_bias")[...].astype(dt) for a, n in zip((q, k, v), "qkv"))
        return q, k, v

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
        q, k, v = self._project_qkv(x)
        q = apply_rotary(q, positions, inv_freq)
        k = apply_rotary(k, positions, inv_freq)
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
        y = jnp.einsum("bthd,hde->bte", out, self.o_proj[...].astype(dt), precision=matmul_precision(dt))
        if cfg.o_bias:
            y = y + self.o_bias[...].astype(dt)
        return y, new_kv


# Sequences longer than BLOCKED_FROM are attended one block of QUERY_BLOCK queries at a time, rematerialised in the
# backward pass, so at most one block's fp32 scores ([batch, heads, block, keys]) are alive: at 4096 tokens and 32
# heads the whole score matrix is 2 GiB per sequence, a 128-query block 64 MiB. Shorter sequences (every CPU run)
# keep the single fused pass.
QUERY_BLOCK = 128
BLOCKED_FROM = 1024


def dot_product_attention(
    q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, key_valid: Array, window: Array | int
) -> Array:
    """Masked softmax attention. ``q`` ``[B,T,H,D]``, ``k``/``v`` ``[B,S,K,D]`` with ``H`` a multiple of ``K``.

    A query at position ``i`` sees keys at positions ``j`` with ``i - window < j <= i`` that are not padding.
    Scores and softmax are fp32, each query row over all keys (so blocking the queries changes no value).
    Grouped KV heads are repeated to the query heads first: the plain 4-D layout is several times faster on CPU
    than a grouped 5-D einsum, and the copy is small next to the scores.
    """
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    if t <= BLOCKED_FROM or t % QUERY_BLOCK:
        return _attention_block(q, k, v, q_pos, k_pos, key_valid, window)
    n = t // QUERY_BLOCK
    q_blocks = jnp.moveaxis(q.reshape(b, n, QUERY_BLOCK, h, d), 1, 0)
    pos_blocks = jnp.moveaxis(q_pos.reshape(b, n, QUERY_BLOCK), 1, 0)
    block = jax.checkpoint(lambda xs: _attention_block(xs[0], k, v, xs[1], k_pos, key_valid, window))
    out = jax.lax.map(block, (q_blocks, pos_blocks))  # [n, B, block, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, t, h, d)


def _attention_block(
    q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, key_valid: Array, window: Array | int
) -> Array:
    d = q.shape[-1]
    scores = jnp.einsum(
        "bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32, precision=matmul_precision(q.dtype)
    ) * (d**-0.5)
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    mask = (delta >= 0) & key_valid[:, None, :]
    if not (isinstance(window, int) and window == NO_WINDOW):  # a static full-causal window masks nothing more
        mask = mask & (delta < window)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Batch axes leading on both operands: XLA's CPU matmuls are several times slower on "bhts,bshd->bthd".
    out = jnp.einsum("bhts,bhsd->bhtd", probs, jnp.swapaxes(v, 1, 2), precision=matmul_precision(q.dtype))
    return jnp.swapaxes(out, 1, 2)


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
        self.gate_proj = param(rngs, (e, m), ("embed", "mlp"), config, "normal")
        self.up_proj = param(rngs, (e, m), ("embed", "mlp"), config, "normal")
        self.down_proj = param(rngs, (m, e), ("mlp", "embed"), config, "normal")
        if config.mlp_bias:
            self.gate_bias = param(None, (m,), ("mlp",), config, "zeros")
            self.up_bias = param(None, (m,), ("mlp",), config, "zeros")
            self.down_bias = param(None, (e,), ("norm",), config, "zeros")

    def __call__(self, x: Array) -> Array:
        dt, prec = x.dtype, matmul_precision(x.dtype)
        if sharding.is_split("mlp"):
            gate = jnp.einsum("bte,em->btm", x, self.gate_proj[...].astype(dt), precision=prec)
            up = jnp.einsum("bte,em->btm", x, self.up_proj[...].astype(dt), precision=prec)
        else:  # one matmul for both, as for the attention projections
            w = jnp.concatenate([self.gate_proj[...], self.up_proj[...]], axis=1).astype(dt)
            gate, up = jnp.split(jnp.einsum("bte,em->btm", x, w, precision=prec), 2, axis=-1)
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


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs, layer_class: type[nnx.Module] = DecoderLayer) -> nnx.Module:
    """``num_layers`` decoder layers as one module whose parameters have a leading ``layers`` axis."""
    keys = jax.random.split(rngs.params(), config.num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: layer_class(config, rngs=nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(layer_class(config, rngs=nnx.Rngs(key))))(keys)
    layers = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable):
            node.set_metadata(axes=("layers", *node.get_metadata()["axes"]))
    return layers


# Stacks of at most LOOP_UP_TO layers run as a Python loop over static slices of the stacked parameters; deeper
# ones as ``lax.scan``, whose compile time does not grow with depth. On CPU a loop of a few layers is much faster:
# the scan's matmuls read their weights through a dynamic slice, and its backward pass stacks every layer's
# residuals into [layers, ...] buffers that are zero-filled and copied into.
LOOP_UP_TO = 8


def _run_layers(layer_step: Any, x: Array, scanned: tuple, num_layers: int) -> tuple[Array, Any]:
    """``lax.scan(layer_step, x, scanned)``, or the same computation unrolled for short stacks."""
    if num_layers > LOOP_UP_TO:
        return jax.lax.scan(layer_step, x, scanned)
    outputs = []
    for i in range(num_layers):
        x, out = layer_step(x, jax.tree.map(lambda a, i=i: a[i], scanned))
        outputs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outputs)


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only causal LM. ``model(tokens, attention_mask)`` returns fp32 logits ``[batch, length, vocab]``.

    Layers are stacked and run with ``jax.lax.scan`` so compile time does not grow with depth; ``config.remat``
    chooses what the backward pass recomputes. Inputs are right-padded token ids with a 1/0 attention mask.
    Another family reuses everything here by subclassing with its own ``layer_class`` (called as
    :class:`DecoderLayer` is) and ``norm_class`` (the final norm).
    """

    layer_class: ClassVar[type[nnx.Module]] = DecoderLayer
    norm_class: ClassVar[type[nnx.Module]] = RMSNorm

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, v = config.hidden_size, config.vocab_size
        self.embedding = param(rngs, (v, e), ("vocab", "embed"), config, "normal")
        self.layers = _stacked_layers(config, rngs, self.layer_class)
        self.final_norm = self.norm_class(config)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (e, v), ("embed", "vocab"), config, "normal")

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
        *,
        upto: int | None = None,
        lora: tuple[Any, dict] | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Final-norm hidden states ``[batch, length, embed]`` in the compute dtype.

        With a ``cache``, ``tokens`` are appended to it (their keys/values written at ``cache.index``), queries
        attend over every cached slot, and ``(hidden, new_cache)`` is returned. With ``upto``, only the first
        ``upto`` decoder layers run and the residual stream after them is returned, without the final norm
        (transformers' ``hidden_states[upto]``: what a forward hook on ``model.layers[upto - 1]`` sees).
        ``lora = (spec, adapters)``: LoRA adapters (stacked over layers) added to each layer's weights as it runs
        (:func:`jaxunlearn.models.lora.merge_layer`).
        """
        cfg = self.config
        if upto is not None and not (1 <= upto <= cfg.num_layers and cache is None):
            raise ValueError(f"upto={upto}: between 1 and num_layers={cfg.num_layers}, without a cache")
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        # Token ids are checked against the vocabulary when the data is prepared: no out-of-range fill (a select
        # over every gathered element, slow on CPU).
        x = self.embedding[...].at[tokens].get(mode="promise_in_bounds").astype(cfg.dtype)
        x = constrain(x, ACTIVATION)

        num_layers = cfg.num_layers if upto is None else upto
        graphdef, state, adapters = self._stacked(num_layers, lora)
        # One window for every layer (the usual case) is a constant, not a scanned value: the compiler then builds
        # no per-layer [length, length] mask, and none at all for full causal attention.
        uniform = len(set(cfg.sliding_windows)) == 1
        windows = None if uniform else jnp.asarray(cfg.sliding_windows[:num_layers], jnp.int32)
        if cache is None:
            key_positions, key_valid = positions, valid
        else:
            key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))

        def layer_step(x: Array, scanned: tuple) -> tuple[Array, tuple | None]:
            layer_state, window, layer_adapters, *kv = scanned
            if layer_adapters is not None:
                layer_state = lora_merge_layer(lora[0], layer_state, layer_adapters)
            window = cfg.sliding_windows[0] if uniform else window
            kv = (kv[0], kv[1], cache.index) if kv else None
            return nnx.merge(graphdef, layer_state)(x, positions, key_positions, key_valid, window, kv)

        if cfg.remat != "none":
            layer_step = jax.checkpoint(layer_step, policy=_REMAT[cfg.remat], prevent_cse=False)
        scanned = (state, windows, adapters) if cache is None else (state, windows, adapters, cache.k, cache.v)
        x, new_kv = _run_layers(layer_step, x, scanned, num_layers)
        if upto is not None:
            return x
        hidden = self.final_norm(x)
        if cache is None:
            return hidden
        k, v = (constrain(a, CACHE_AXES) for a in new_kv)
        return hidden, KVCache(k, v, key_positions, key_valid, cache.index + t)

    def _stacked(self, num_layers: int, lora: tuple[Any, dict] | None) -> tuple[Any, dict, dict | None]:
        """``(graphdef, params, adapters)`` of the first ``num_layers`` stacked layers (nothing else runs)."""
        graphdef, state = nnx.split(self.layers)
        stacked = (state.to_pure_dict(), None if lora is None else lora[1]["layers"])
        if num_layers < self.config.num_layers:
            stacked = jax.tree.map(lambda a: a[:num_layers], stacked)
        return graphdef, *stacked

    def head_kernel(self) -> Array:
        """The output projection as ``[embed, vocab]`` (the transposed embedding when tied)."""
        return self.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: Array) -> Array:
        """Project hidden states to fp32 vocabulary logits (accumulated in fp32)."""
        w = self.head_kernel().astype(hidden.dtype)
        out = jnp.einsum(
            "bte,ev->btv", hidden, w, preferred_element_type=jnp.float32, precision=matmul_precision(hidden.dtype)
        )
        return constrain(out, ("batch", "length", "vocab"))
