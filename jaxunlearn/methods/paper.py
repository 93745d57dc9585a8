"""The paper's methods: gradient ascent, random labels, adversarial samples, and ascent with a retain term
(GA+GD, GA+KL)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxunlearn.methods.context import Context, has_target, mean_over_sequences, targets_of
from jaxunlearn.methods.registry import Array, Needs, Split, register
from jaxunlearn.models import losses

# Stream id folded into the run seed for random labels, so they never collide with other uses of the seed.
_RANDOM_LABEL_STREAM = 0x5EED


# --- the paper's methods ----------------------------------------------------------------------------------


# The capped ascent's settings (:func:`ascent_term`), shared by the gradient-ascent methods; 0 = off.
CAP_HPARAMS = {"forget_nll_cap": 0.0, "forget_nll_cap_margin": 0.0}


def ascent_term(seq_nll: Array, valid: Array, ctx: Context) -> Array:
    """The forget term gradient ascent maximises: the mean over chunks of the per-chunk NLL, each capped at
    ``forget_nll_cap`` nats when that is > 0 (0, the default, is the paper's uncapped ascent). A run with
    ``forget_nll_cap_margin`` > 0 sets the cap before training to the original model's mean chunk NLL on the
    approximate (unseen) split plus that margin (:func:`jaxunlearn.run.engine.resolve_method`).

    A chunk whose NLL is above the cap gets no ascent gradient, so the ascent cannot run away on chunks that
    already look unseen while others are still memorised; retain descent keeps working meanwhile."""
    cap = ctx.hparams.get("forget_nll_cap", 0.0)
    return mean_over_sequences(jnp.minimum(seq_nll, cap) if cap > 0 else seq_nll, valid)


def with_retain_term(loss: Array, metrics: dict, name: str, value: Callable[[], Array], ctx: Context):
    """Add ``retain_weight x value()`` when the weight is > 0 (a zero weight drops the term and its data)."""
    weight = ctx.hparams["retain_weight"]
    if not weight:
        return loss, metrics
    term = value()
    return loss + weight * term, {**metrics, name: term}


def retain_needs(reference: bool) -> Callable[[Mapping[str, Any]], Needs]:
    """Retain chunks when ``retain_weight`` > 0; a reference forward on them for a KL term (``reference``)."""

    def needs_rule(hp: Mapping[str, Any]) -> Needs:
        retain = hp["retain_weight"] > 0
        uses_reference = reference and retain
        return Needs(retain=retain, reference=uses_reference, reference_forwards=int(uses_reference))

    return needs_rule


def trained_hidden(params: dict, batch: Mapping[str, Split], ctx: Context) -> dict[str, Array]:
    """The trained model's hidden states on the forget chunks, and on the retain chunks when the method's retain
    term is on (``retain_weight`` > 0), from one forward pass."""
    names = ("forget", "retain") if ctx.hparams.get("retain_weight") else ("forget",)
    return dict(zip(names, ctx.hidden(params, *(ctx.split(batch, name) for name in names))))


def retain_nll_term(params: dict, hidden: Mapping[str, Array], batch: Mapping[str, Split], ctx: Context) -> Array:
    retain = ctx.split(batch, "retain")
    return mean_over_sequences(ctx.nll_of_hidden(params, hidden["retain"], retain), has_target(retain))


def retain_kl_term(params, ref_params, hidden: Mapping[str, Array], batch: Mapping[str, Split], ctx: Context) -> Array:
    return ctx.mean_kl_of_hidden(params, hidden["retain"], ref_params, ctx.split(batch, "retain"))


def ascent_loss(params: dict, hidden: Array, forget: Split, ctx: Context) -> tuple[Array, dict[str, Array]]:
    """Gradient ascent's loss (the negated :func:`ascent_term`) and the forget NLL, from hidden states."""
    forget_nll, valid = ctx.nll_of_hidden(params, hidden, forget), has_target(forget)
    return -ascent_term(forget_nll, valid, ctx), {"forget_nll": mean_over_sequences(forget_nll, valid)}


@register("ga", **CAP_HPARAMS)
def gradient_ascent(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent: maximise the forget chunks' NLL (minimise its negation)."""
    forget = ctx.split(batch, "forget")
    (hidden,) = ctx.hidden(params, forget)
    return ascent_loss(params, hidden, forget, ctx)


def random_labels(chunk_ids: Array, length: int, seed: int, label_ids: Array) -> Array:
    """Uniform labels from ``label_ids``, a fixed function of (seed, chunk id, position): the same every epoch,
    on every mesh and in every batch composition."""
    key = jax.random.fold_in(jax.random.key(seed), _RANDOM_LABEL_STREAM)

    def one(chunk_id: Array) -> Array:
        idx = jax.random.randint(jax.random.fold_in(key, chunk_id), (length,), 0, label_ids.shape[0])
        return label_ids[idx]

    return jax.vmap(one)(chunk_ids)


@register("random_label", needs=Needs(extras=frozenset({"label_ids"})))
def random_label(params, ref_params, batch, rng, ctx: Context):
    """Fine-tune forget chunks on labels drawn uniformly from the vocabulary, fixed per chunk."""
    forget = ctx.split(batch, "forget")
    label_ids = jnp.asarray(ctx.extras["label_ids"])
    labels = random_labels(forget["chunk_id"], forget["tokens"].shape[1], ctx.seed, label_ids)
    label_nll = ctx.mean_nll(params, forget, targets=labels)
    return label_nll, {"label_nll": label_nll}


def adversarial_labels(params: dict, split: Split, ctx: Context) -> Array:
    """At each position, the original model's most likely next token other than the true next token."""
    true_targets, _ = targets_of(split)
    hidden = ctx.forward(params, split)
    labels = losses.top_token_excluding(hidden, ctx.model.head(params), true_targets, chunk_size=ctx.chunk_size)
    return jax.lax.stop_gradient(labels)


@register("adversarial", needs=Needs(reference=True, reference_forwards=1))
def adversarial(params, ref_params, batch, rng, ctx: Context):
    """Fine-tune forget chunks on the original model's best wrong next token (adversarial samples)."""
    forget = ctx.split(batch, "forget")
    label_nll = ctx.mean_nll(params, forget, targets=adversarial_labels(ref_params, forget, ctx))
    return label_nll, {"label_nll": label_nll}


@register("ga_gd", needs=retain_needs(reference=False), forget_weight=1.0, retain_weight=1.0, **CAP_HPARAMS)
def ga_gd(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent on forget chunks plus gradient descent on retain chunks."""
    hidden = trained_hidden(params, batch, ctx)
    loss, metrics = ascent_loss(params, hidden["forget"], ctx.split(batch, "forget"), ctx)
    loss = ctx.hparams["forget_weight"] * loss
    return with_retain_term(loss, metrics, "retain_nll", lambda: retain_nll_term(params, hidden, batch, ctx), ctx)


@register("ga_kl", needs=retain_needs(reference=True), forget_weight=1.0, retain_weight=1.0, **CAP_HPARAMS)
def ga_kl(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent on forget chunks plus KL(original || current) on retain chunks."""
    hidden = trained_hidden(params, batch, ctx)
    loss, metrics = ascent_loss(params, hidden["forget"], ctx.split(batch, "forget"), ctx)
    loss = ctx.hparams["forget_weight"] * loss
    retain_kl = lambda: retain_kl_term(params, ref_params, hidden, batch, ctx)  # noqa: E731
    return with_retain_term(loss, metrics, "retain_kl", retain_kl, ctx)
