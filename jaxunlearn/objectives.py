"""Unlearning objectives: one short pure function per method, registered by name.

Every objective has the signature ``(params, ref_params, batch, rng, ctx) -> (loss, metrics)``:

* ``params``: the trainable parameters; ``ref_params``: the frozen original model (``None`` unless the method
  declares ``needs_reference``);
* ``batch``: ``{"forget": split, "retain": split}`` where a split is ``{"tokens", "mask", "chunk_id"}`` with
  ``[batch, length]`` right-padded arrays (``retain`` only for methods declaring ``needs_retain``);
* ``rng``: a per-step PRNG key; ``ctx``: the model functions and the method's hyper-parameters.

Normalisation follows the official code: a *per-sequence token mean* of the per-token quantity over the
sequence's valid positions, then the *mean over sequences*; padding never counts. The loss is minimised, so
ascent terms enter with a minus sign. Adding a method means adding one function here and one config file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxunlearn import losses
from jaxunlearn.models import LanguageModel

Array = jax.Array
Split = Mapping[str, Array]
Objective = Callable[..., tuple[Array, dict[str, Array]]]

# Stream id folded into the run seed for random labels, so they never collide with other uses of the seed.
_RANDOM_LABEL_STREAM = 0x5EED


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: Objective
    needs_retain: bool
    needs_reference: bool
    hparams: Mapping[str, Any]
    summary: str


METHODS: dict[str, Method] = {}


def register(name: str, *, needs_retain: bool = False, needs_reference: bool = False, **hparams: Any):
    """Register an objective under ``name`` with its default hyper-parameters (overridable in config)."""

    def decorate(fn: Objective) -> Objective:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, fn, needs_retain, needs_reference, dict(hparams), summary)
        return fn

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown unlearning method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclasses.dataclass(frozen=True)
class Context:
    """What objectives need besides arrays: model functions, hyper-parameters and run constants."""

    model: LanguageModel
    hparams: Mapping[str, Any]
    seed: int = 0
    # Token ids random labels are drawn from (the tokenizer's vocabulary minus its special tokens).
    label_ids: Any = None
    chunk_size: int = 1024

    def nll(self, params: dict, split: Split, targets: Array | None = None) -> Array:
        """Per-sequence mean NLL ``[batch]`` of ``targets`` (default: the true next tokens)."""
        true_targets, target_mask = losses.next_token_targets(split["tokens"], split["mask"])
        hidden = self.model.hidden_states(params, split["tokens"], split["mask"])
        targets = true_targets if targets is None else targets
        logp = losses.token_logprobs(hidden, self.model.head(params), targets, chunk_size=self.chunk_size)
        return losses.sequence_mean(-logp, target_mask)

    def kl_from_reference(self, params: dict, ref_params: dict, split: Split) -> Array:
        """Per-sequence mean ``KL(p_ref || p)`` ``[batch]`` over the non-padding positions."""
        ref_hidden = self.model.hidden_states(ref_params, split["tokens"], split["mask"])
        hidden = self.model.hidden_states(params, split["tokens"], split["mask"])
        kl = losses.token_kl(
            jax.lax.stop_gradient(ref_hidden),
            jax.lax.stop_gradient(self.model.head(ref_params)),
            hidden,
            self.model.head(params),
            chunk_size=self.chunk_size,
        )
        return losses.sequence_mean(kl, split["mask"])


# --- the paper's methods ----------------------------------------------------------------------------------


def ascent_term(seq_nll: Array, ctx: Context) -> Array:
    """The forget term gradient ascent maximises: the mean over chunks of the per-chunk NLL, each capped at
    ``forget_nll_cap`` nats when that is > 0 (0, the default, is the paper's uncapped ascent).

    A chunk whose NLL is above the cap gets no ascent gradient, so the ascent cannot run away on chunks that
    already look unseen while others are still memorised; retain descent keeps working meanwhile."""
    cap = ctx.hparams.get("forget_nll_cap", 0.0)
    return jnp.mean(jnp.minimum(seq_nll, cap) if cap > 0 else seq_nll)


@register("ga", forget_nll_cap=0.0)
def gradient_ascent(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent: maximise the forget chunks' NLL (minimise its negation)."""
    forget_nll = ctx.nll(params, batch["forget"])
    return -ascent_term(forget_nll, ctx), {"forget_nll": jnp.mean(forget_nll)}


def random_labels(chunk_ids: Array, length: int, seed: int, label_ids: Array) -> Array:
    """Uniform labels from ``label_ids``, a fixed function of (seed, chunk id, position): the same every epoch,
    on every mesh and in every batch composition."""
    key = jax.random.fold_in(jax.random.key(seed), _RANDOM_LABEL_STREAM)

    def one(chunk_id: Array) -> Array:
        idx = jax.random.randint(jax.random.fold_in(key, chunk_id), (length,), 0, label_ids.shape[0])
        return label_ids[idx]

    return jax.vmap(one)(chunk_ids)


@register("random_label")
def random_label(params, ref_params, batch, rng, ctx: Context):
    """Fine-tune forget chunks on labels drawn uniformly from the vocabulary, fixed per chunk."""
    forget = batch["forget"]
    labels = random_labels(forget["chunk_id"], forget["tokens"].shape[1], ctx.seed, jnp.asarray(ctx.label_ids))
    label_nll = ctx.nll(params, forget, targets=labels)
    return jnp.mean(label_nll), {"label_nll": jnp.mean(label_nll)}


def adversarial_labels(params: dict, split: Split, ctx: Context) -> Array:
    """At each position, the original model's most likely next token other than the true next token."""
    true_targets, _ = losses.next_token_targets(split["tokens"], split["mask"])
    hidden = ctx.model.hidden_states(params, split["tokens"], split["mask"])
    labels = losses.top_token_excluding(hidden, ctx.model.head(params), true_targets, chunk_size=ctx.chunk_size)
    return jax.lax.stop_gradient(labels)


@register("adversarial", needs_reference=True)
def adversarial(params, ref_params, batch, rng, ctx: Context):
    """Fine-tune forget chunks on the original model's best wrong next token (adversarial samples)."""
    forget = batch["forget"]
    label_nll = ctx.nll(params, forget, targets=adversarial_labels(ref_params, forget, ctx))
    return jnp.mean(label_nll), {"label_nll": jnp.mean(label_nll)}


@register("ga_gd", needs_retain=True, forget_weight=1.0, retain_weight=1.0, forget_nll_cap=0.0)
def ga_gd(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent on forget chunks plus gradient descent on retain chunks."""
    forget_nll = ctx.nll(params, batch["forget"])
    retain_nll = jnp.mean(ctx.nll(params, batch["retain"]))
    loss = -ctx.hparams["forget_weight"] * ascent_term(forget_nll, ctx) + ctx.hparams["retain_weight"] * retain_nll
    return loss, {"forget_nll": jnp.mean(forget_nll), "retain_nll": retain_nll}


@register("ga_kl", needs_retain=True, needs_reference=True, forget_weight=1.0, retain_weight=1.0, forget_nll_cap=0.0)
def ga_kl(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent on forget chunks plus KL(original || current) on retain chunks."""
    forget_nll = ctx.nll(params, batch["forget"])
    retain_kl = jnp.mean(ctx.kl_from_reference(params, ref_params, batch["retain"]))
    loss = -ctx.hparams["forget_weight"] * ascent_term(forget_nll, ctx) + ctx.hparams["retain_weight"] * retain_kl
    return loss, {"forget_nll": jnp.mean(forget_nll), "retain_kl": retain_kl}


# --- beyond the paper ---------------------------------------------------------------------------------------


@register("npo", needs_reference=True, beta=0.1, retain_weight=0.0)
def negative_preference_optimization(params, ref_params, batch, rng, ctx: Context):
    """NPO (Zhang et al. 2024): ``-(2/beta) log sigmoid(-beta (log p(x) - log p_ref(x)))`` on forget chunks,
    with sequence log-likelihoods summed over tokens; plus ``retain_weight`` x KL on retain chunks when > 0."""
    forget = batch["forget"]
    _, target_mask = losses.next_token_targets(forget["tokens"], forget["mask"])
    n_tokens = jnp.maximum(jnp.sum(target_mask, axis=-1), 1)
    logp = -ctx.nll(params, forget) * n_tokens
    ref_logp = jax.lax.stop_gradient(-ctx.nll(ref_params, forget) * n_tokens)
    beta = ctx.hparams["beta"]
    npo = jnp.mean(-(2.0 / beta) * jax.nn.log_sigmoid(-beta * (logp - ref_logp)))
    metrics = {"npo": npo, "forget_nll": jnp.mean(-logp / n_tokens)}
    loss = npo
    if ctx.hparams["retain_weight"] and "retain" in batch:
        retain_kl = jnp.mean(ctx.kl_from_reference(params, ref_params, batch["retain"]))
        loss = loss + ctx.hparams["retain_weight"] * retain_kl
        metrics["retain_kl"] = retain_kl
    return loss, metrics


@register("npo_gd", needs_retain=True, needs_reference=True, beta=0.1, forget_weight=1.0, retain_weight=1.0)
def npo_gd(params, ref_params, batch, rng, ctx: Context):
    """NPO on forget chunks plus gradient descent on retain chunks (open-unlearning's and MUSE's NPO_GDR)."""
    npo, metrics = negative_preference_optimization(params, ref_params, {"forget": batch["forget"]}, rng, ctx)
    retain_nll = jnp.mean(ctx.nll(params, batch["retain"]))
    loss = ctx.hparams["forget_weight"] * npo + ctx.hparams["retain_weight"] * retain_nll
    return loss, {**metrics, "retain_nll": retain_nll}
