"""Greedy decoding with a KV cache, jitted end to end (prefill + ``lax.scan`` over new tokens).

Prompts are left-padded ``[batch, prompt_len]`` token ids with a 1/0 mask; positions count only real tokens, so
a padded prompt decodes exactly as it would alone. Generation always runs ``max_new_tokens`` steps (fixed
shapes); stop strings are applied by the caller on the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxunlearn.models import LanguageModel
from jaxunlearn.parallel import sharding


def greedy_tokens(
    lm: LanguageModel, params: dict, prompts: jax.Array, prompt_mask: jax.Array, max_new_tokens: int
) -> jax.Array:
    """``[batch, max_new_tokens]`` greedy continuation of left-padded ``prompts`` (traceable; jit it)."""
    model, lora = lm.bind(params), lm.adapters(params)
    batch, length = prompts.shape
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = lm.config.family.init_cache(lm.config, batch, length + max_new_tokens)
    hidden, cache = model.hidden_states(prompts, prompt_mask, positions, cache, lora=lora)
    first = jnp.argmax(model.logits(hidden[:, -1:]), axis=-1)[:, 0].astype(jnp.int32)
    last = positions[:, -1]

    def step(carry, i):
        token, cache = carry
        hidden, cache = model.hidden_states(token[:, None], None, (last + 1 + i)[:, None], cache, lora=lora)
        nxt = jnp.argmax(model.logits(hidden), axis=-1)[:, 0].astype(jnp.int32)
        return (nxt, cache), token

    _, tokens = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens))
    return tokens.T


@functools.lru_cache(maxsize=32)
def _compiled(lm: LanguageModel, max_new_tokens: int, mesh, rules, batch_sharding) -> callable:
    def run(params, prompts, mask):
        with sharding.activation_sharding(mesh, rules):
            return greedy_tokens(lm, params, prompts, mask, max_new_tokens)

    # Replicated output: every process can read the whole result on a multi-host runtime.
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(run, in_shardings=(None, batch_sharding, batch_sharding), out_shardings=replicated)


def generate(
    lm: LanguageModel,
    params: dict,
    prompts: np.ndarray,
    prompt_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    mesh=None,
    batch_size: int = 8,
    rules: sharding.Rules | None = None,
) -> np.ndarray:
    """Greedy continuations for a host array of left-padded prompts, in sharded batches.

    The batch is split over the mesh axes that ``rules`` map ``batch`` to (``data`` x ``fsdp`` by default);
    ``batch_size`` is rounded up to a multiple of that split and the last batch is padded to it.
    """
    prompts = np.asarray(prompts, np.int32)
    mask = np.ones_like(prompts) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
    mesh = mesh or sharding.single_device_mesh()
    rules = sharding.normalize_rules(rules)
    ways = sharding.batch_ways(mesh, rules)
    batch_size = -(-batch_size // ways) * ways
    spec = sharding.named_sharding(("batch", "length"), rules, mesh, (batch_size, prompts.shape[1]))
    fn = _compiled(lm, max_new_tokens, mesh, rules, spec)
    out = []
    for start in range(0, len(prompts), batch_size):
        p, m = prompts[start : start + batch_size], mask[start : start + batch_size]
        n = len(p)
        if n < batch_size:  # pad with copies of the first row; results are dropped
            p = np.concatenate([p, np.repeat(p[:1], batch_size - n, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch_size - n, 0)])
        p, m = sharding.host_to_global((p, m), (spec, spec))
        out.append(np.asarray(jax.device_get(fn(params, p, m)))[:n])
    return np.concatenate(out) if out else np.zeros((0, max_new_tokens), np.int32)
