"""Token-level numerics shared by every objective and by evaluation.

Vocabulary-sized arrays are the memory hot spot of LLM losses (4096 tokens x 64k vocab x 4 bytes = 1 GiB per
sequence). Everything here therefore starts from final hidden states and projects them to logits one
sequence chunk at a time (``chunk_size`` positions), under ``jax.checkpoint`` so the backward pass recomputes
each chunk's logits instead of storing them.

Conventions: ``tokens``/``mask`` are ``[batch, length]`` right-padded inputs. Position ``t`` predicts token
``t + 1``; :func:`next_token_targets` builds the shifted targets and their mask (a target counts only when both
its input position and the predicted token are real tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxunlearn.models.precision import matmul_precision
from jaxunlearn.parallel.sharding import constrain

Array = jax.Array


def next_token_targets(tokens: Array, mask: Array, prompt_length: Array | None = None) -> tuple[Array, Array]:
    """``(targets, target_mask)``: ``targets[:, t] = tokens[:, t + 1]``; the last position has no target.

    ``prompt_length`` ``[batch]`` (question-answer chunks): the first ``prompt_length`` tokens are context only,
    never targets, so only the answer's tokens are scored (0 for plain text: every token after the first).
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    mask = mask.astype(bool)
    target_mask = jnp.concatenate([mask[:, 1:] & mask[:, :-1], jnp.zeros_like(mask[:, :1])], axis=1)
    if prompt_length is not None:
        target_mask = target_mask & answer_positions(mask, prompt_length, shift=1)
    return targets, target_mask


def answer_positions(mask: Array, prompt_length: Array | None, *, shift: int = 0) -> Array:
    """``[batch, length]`` bool: the non-padding positions ``t`` with ``t + shift >= prompt_length`` (the answer's
    tokens with ``shift=0``; the positions that predict them, and any after, with ``shift=1``). Without
    ``prompt_length`` (plain text): every non-padding position."""
    mask = mask.astype(bool)
    if prompt_length is None:
        return mask
    positions = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :] + shift
    return mask & (positions >= jnp.asarray(prompt_length, jnp.int32)[:, None])


def map_sequence_chunks(fn: Callable[..., Any], chunk_size: int, *arrays: Array) -> Any:
    """Apply ``fn`` to ``[batch, chunk, ...]`` slices of ``[batch, length, ...]`` arrays; concatenate along length.

    ``fn`` returns a ``[batch, chunk]`` array or a pytree of them. Chunks are processed sequentially
    (``lax.map``) and rematerialised, so at most one chunk of logits is alive at a time, in the forward and in
    the backward pass.
    """
    length = arrays[0].shape[1]
    chunk = max(1, min(chunk_size, length))
    if chunk == length:
        return fn(*arrays)
    n = math.ceil(length / chunk)
    pad = n * chunk - length

    def split(x: Array) -> Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split(a) for a in arrays))  # leaves [n, B, chunk]

    def join(x: Array) -> Array:
        return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n * chunk)[:, :length]

    return jax.tree.map(join, out)


def _logits(hidden: Array, head: Array) -> Array:
    # The head is pinned to its parameter sharding here so that its gradient, summed over the sequence chunks,
    # is reduced to shards chunk by chunk instead of being accumulated whole on every device.
    head = constrain(head, ("embed", "vocab"))
    # The same precision rule as the model's layers: an fp32 run projects in full fp32 on TPU/GPU too.
    logits = jnp.einsum(
        "bte,ev->btv",
        hidden,
        head.astype(hidden.dtype),
        preferred_element_type=jnp.float32,
        precision=matmul_precision(hidden.dtype),
    )
    return constrain(logits, ("batch", "length", "vocab"))


def _shifted(logits: Array) -> Array:
    """``logits - max(logits)`` over the vocabulary, the max a constant (no gradient), as in ``logsumexp``."""
    return logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))


def token_logprobs(hidden: Array, head: Array, targets: Array, *, chunk_size: int = 1024) -> Array:
    """``log p(targets[b, t] | hidden[b, t])`` as fp32 ``[batch, length]``."""

    def fn(h: Array, y: Array) -> Array:
        logits = _logits(h, head)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    return map_sequence_chunks(fn, chunk_size, hidden, targets)


def token_kl(ref_hidden: Array, ref_head: Array, hidden: Array, head: Array, *, chunk_size: int = 1024) -> Array:
    """Per-position ``KL(p_ref || p)`` over the vocabulary, fp32 ``[batch, length]``."""

    def fn(hr: Array, h: Array) -> Array:
        # With s = logits - max (the max a constant shift, as in logsumexp) and Z = sum(exp(s)):
        # KL = sum(exp(s_ref) * (s_ref - s)) / Z_ref - log Z_ref + log Z, with no normalised [.., vocab] array.
        ref_shifted = _shifted(_logits(hr, ref_head))
        shifted = _shifted(_logits(h, head))
        ref_e = jnp.exp(ref_shifted)
        ref_z = jnp.sum(ref_e, axis=-1)
        cross = jnp.sum(ref_e * (ref_shifted - shifted), axis=-1) / ref_z
        return cross - jnp.log(ref_z) + jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))

    return map_sequence_chunks(fn, chunk_size, ref_hidden, hidden)


def token_dampened_distillation(
    ref_hidden: Array,
    ref_head: Array,
    hidden: Array,
    head: Array,
    targets: Array,
    dampen: float,
    *,
    chunk_size: int = 1024,
) -> Array:
    """Per-position cross-entropy ``-sum_v q_v log p_v`` of the model ``p`` against the frozen teacher's
    distribution with the target's logit lowered by ``dampen``, ``q = softmax(z_ref - dampen * onehot(target))``
    (UNDIAL's self-distillation target), fp32 ``[batch, length]``; no gradient reaches the teacher."""

    def fn(hr: Array, h: Array, y: Array) -> Array:
        teacher = _logits(hr, ref_head)
        vocab = jnp.arange(teacher.shape[-1], dtype=y.dtype)
        teacher = jax.lax.stop_gradient(jnp.where(vocab == y[..., None], teacher - dampen, teacher))
        q = jnp.exp(_shifted(teacher))
        shifted = _shifted(_logits(h, head))
        # CE = log Z - E_q[s] with s = logits - max (the max a constant) and Z = sum(exp(s)).
        return jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) - jnp.sum(q * shifted, axis=-1) / jnp.sum(q, axis=-1)

    return map_sequence_chunks(fn, chunk_size, ref_hidden, hidden, targets)


def token_excluded_target_ce(hidden: Array, head: Array, targets: Array, *, chunk_size: int = 1024) -> Array:
    """Per-position cross-entropy ``-sum_v q_v log p_v`` of the model against its own distribution with the
    target ruled out, ``q = softmax(z)`` renormalised over ``v != target`` and taken without gradient (CE-U's
    target), fp32 ``[batch, length]``. Its gradient on the logits is ``p - q``: the target's probability is pushed
    down and the rest of the distribution keeps its shape. A position whose other tokens all underflow gives
    ``log Z`` (no target distribution to follow)."""

    def fn(h: Array, y: Array) -> Array:
        shifted = _shifted(_logits(h, head))
        e = jnp.exp(shifted)
        vocab = jnp.arange(shifted.shape[-1], dtype=y.dtype)
        q = jax.lax.stop_gradient(jnp.where(vocab == y[..., None], 0.0, e))
        z_q = jnp.maximum(jnp.sum(q, axis=-1), jnp.finfo(jnp.float32).tiny)
        return jnp.log(jnp.sum(e, axis=-1)) - jnp.sum(q * shifted, axis=-1) / z_q

    return map_sequence_chunks(fn, chunk_size, hidden, targets)


def top_token_excluding(hidden: Array, head: Array, excluded: Array, *, chunk_size: int = 1024) -> Array:
    """The argmax token at each position with ``excluded[b, t]`` ruled out, ``[batch, length]`` int32."""

    def fn(h: Array, x: Array) -> Array:
        logits = _logits(h, head)
        vocab = jnp.arange(logits.shape[-1], dtype=x.dtype)
        logits = jnp.where(vocab == x[..., None], -jnp.inf, logits)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return map_sequence_chunks(fn, chunk_size, hidden, excluded)


def sequence_mean(values: Array, mask: Array) -> Array:
    """Per-sequence mean of ``values`` over ``mask`` (``[batch]``); a sequence with no valid position gives 0."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def vocabulary_stats(
    hidden: Array, head: Array, targets: Array, *, chunk_size: int = 1024, moments: bool = True
) -> dict[str, Array]:
    """Per position, from one pass over the vocabulary (fp32 ``[batch, length]`` each):

    ``logprob`` of the target, ``is_argmax`` (the target's logit is the largest: greedy decoding picks it, or a
    token tied with it), and with ``moments`` the ``mean``/``std`` of the log-probabilities under the model's own
    distribution, ``E_{z~p}[log p(z)]`` and its standard deviation (the normalisers of Min-K%++).

    The moments come from sums over ``exp(s)`` with ``s = logits - max``: ``E[log p] = E[s] - log Z`` and
    ``Var[log p] = Var[s]``, so no normalised ``[.., vocab]`` array is materialised.
    """

    def fn(h: Array, y: Array) -> dict[str, Array]:
        logits = _logits(h, head)
        top = jnp.max(logits, axis=-1)
        shifted = logits - top[..., None]
        e = jnp.exp(shifted)
        z = jnp.sum(e, axis=-1)
        log_z = jnp.log(z)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        out = {"logprob": picked - top - log_z, "is_argmax": picked >= top}
        if moments:
            mean_s = jnp.sum(e * shifted, axis=-1) / z
            var = jnp.maximum(jnp.sum(e * shifted * shifted, axis=-1) / z - mean_s * mean_s, 0.0)
            out.update(mean=mean_s - log_z, std=jnp.sqrt(var))
        return out

    return map_sequence_chunks(fn, chunk_size, hidden, targets)
