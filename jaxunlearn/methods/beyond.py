"""Methods beyond the paper: NPO and NPO+GD, SimNPO, WGA, SatImp, UNDIAL and CE-U."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxunlearn.methods.context import Context, has_target, mean_over_sequences, targets_of
from jaxunlearn.methods.paper import (
    retain_kl_term,
    retain_needs,
    retain_nll_term,
    trained_hidden,
    with_retain_term,
)
from jaxunlearn.methods.registry import Array, Needs, Split, register
from jaxunlearn.models import losses

# --- beyond the paper ---------------------------------------------------------------------------------------


def _npo_needs(retain_kl: bool) -> Callable[[Mapping[str, Any]], Needs]:
    """NPO's reference forward on forget chunks; retain chunks when ``retain_weight`` > 0, with one more reference
    forward on them for a KL retain term (``retain_kl``)."""

    def needs_rule(hp: Mapping[str, Any]) -> Needs:
        retain = hp["retain_weight"] > 0
        return Needs(retain=retain, reference=True, reference_forwards=1 + int(retain and retain_kl))

    return needs_rule


def npo_term(
    params: dict, ref_params: dict, hidden: Array, forget: Split, ctx: Context
) -> tuple[Array, dict[str, Array]]:
    """``-(2/beta) log sigmoid(-beta (log p(x) - log p_ref(x)))`` averaged over forget chunks, with sequence
    log-likelihoods summed over tokens (``hidden``: the trained model's hidden states on ``forget``)."""
    _, target_mask = targets_of(forget)
    valid = target_mask.any(-1)
    n_tokens = jnp.maximum(jnp.sum(target_mask, axis=-1), 1)
    logp = -ctx.nll_of_hidden(params, hidden, forget) * n_tokens
    ref_logp = jax.lax.stop_gradient(-ctx.nll(ref_params, forget) * n_tokens)
    beta = ctx.hparams["beta"]
    npo = mean_over_sequences(-(2.0 / beta) * jax.nn.log_sigmoid(-beta * (logp - ref_logp)), valid)
    return npo, {"npo": npo, "forget_nll": mean_over_sequences(-logp / n_tokens, valid)}


@register("npo", needs=_npo_needs(retain_kl=True), beta=0.1, retain_weight=0.0)
def negative_preference_optimization(params, ref_params, batch, rng, ctx: Context):
    """NPO (Zhang et al. 2024) on forget chunks, plus ``retain_weight`` x KL(original || current) on retain
    chunks when > 0."""
    hidden = trained_hidden(params, batch, ctx)
    loss, metrics = npo_term(params, ref_params, hidden["forget"], ctx.split(batch, "forget"), ctx)
    retain_kl = lambda: retain_kl_term(params, ref_params, hidden, batch, ctx)  # noqa: E731
    return with_retain_term(loss, metrics, "retain_kl", retain_kl, ctx)


@register("npo_gd", needs=_npo_needs(retain_kl=False), beta=0.1, forget_weight=1.0, retain_weight=1.0)
def npo_gd(params, ref_params, batch, rng, ctx: Context):
    """NPO on forget chunks plus gradient descent on retain chunks (open-unlearning's and MUSE's NPO_GDR)."""
    hidden = trained_hidden(params, batch, ctx)
    npo, metrics = npo_term(params, ref_params, hidden["forget"], ctx.split(batch, "forget"), ctx)
    loss = ctx.hparams["forget_weight"] * npo
    return with_retain_term(loss, metrics, "retain_nll", lambda: retain_nll_term(params, hidden, batch, ctx), ctx)


@register("simnpo", needs=retain_needs(reference=False), beta=4.5, gamma=0.0, forget_weight=1.0, retain_weight=1.0)
def simnpo(params, ref_params, batch, rng, ctx: Context):
    """SimNPO (Fan et al. 2024, arXiv 2410.07163): NPO without a reference model, on the length-normalised
    log-likelihood with a margin ``gamma``: ``-(2/beta) log sigmoid(-(beta/|y|) log p(y) - gamma)`` per forget chunk
    (``-(1/|y|) log p(y)`` is the chunk's mean NLL), plus ``retain_weight`` x NLL(retain) when > 0."""
    hidden = trained_hidden(params, batch, ctx)
    forget = ctx.split(batch, "forget")
    nll, valid = ctx.nll_of_hidden(params, hidden["forget"], forget), has_target(forget)
    beta, gamma = ctx.hparams["beta"], ctx.hparams["gamma"]
    term = mean_over_sequences(-(2.0 / beta) * jax.nn.log_sigmoid(beta * nll - gamma), valid)
    metrics = {"simnpo": term, "forget_nll": mean_over_sequences(nll, valid)}
    loss = ctx.hparams["forget_weight"] * term
    return with_retain_term(loss, metrics, "retain_nll", lambda: retain_nll_term(params, hidden, batch, ctx), ctx)


def weighted_ascent_term(
    params: dict, hidden: Array, forget: Split, ctx: Context, weight: Callable[[Array], Array]
) -> tuple[Array, Array]:
    """``(term, forget NLL)``: the mean over forget chunks of the per-chunk token mean of ``weight(p_t) log p_t``,
    ``p_t`` the probability of the true next token with no gradient through the weight. Minimising it is gradient
    ascent on each token's NLL weighted by ``weight(p_t)``. (open-unlearning averages over every token of the batch
    at once; here each chunk weighs the same, as in every jaxunlearn objective: equal for full chunks.)"""
    targets, target_mask = targets_of(forget)
    logp = losses.token_logprobs(hidden, ctx.model.head(params), targets, chunk_size=ctx.chunk_size)
    w = weight(jax.lax.stop_gradient(jnp.exp(logp)))
    valid = has_target(forget)
    term = mean_over_sequences(losses.sequence_mean(w * logp, target_mask), valid)
    return term, mean_over_sequences(losses.sequence_mean(-logp, target_mask), valid)


def _weighted_ascent_with_retain(params, batch, ctx: Context, name: str, weight: Callable[[Array], Array]):
    hidden = trained_hidden(params, batch, ctx)
    term, forget_nll = weighted_ascent_term(params, hidden["forget"], ctx.split(batch, "forget"), ctx, weight)
    loss = ctx.hparams["forget_weight"] * term
    metrics = {name: term, "forget_nll": forget_nll}
    return with_retain_term(loss, metrics, "retain_nll", lambda: retain_nll_term(params, hidden, batch, ctx), ctx)


@register("wga", needs=retain_needs(reference=False), beta=1.0, forget_weight=1.0, retain_weight=1.0)
def weighted_gradient_ascent(params, ref_params, batch, rng, ctx: Context):
    """WGA (Wang et al. 2025, arXiv 2502.19301): gradient ascent with each token's NLL weighted by ``p_t^beta``, so
    tokens already unlikely stop pulling (:func:`weighted_ascent_term`), plus ``retain_weight`` x NLL(retain)."""
    beta = ctx.hparams["beta"]
    return _weighted_ascent_with_retain(params, batch, ctx, "wga", lambda p: p**beta)


@register("satimp", needs=retain_needs(reference=False), beta1=5.0, beta2=1.0, forget_weight=1.0, retain_weight=1.0)
def saturation_importance(params, ref_params, batch, rng, ctx: Context):
    """SatImp (Yang et al. 2025, arXiv 2505.11953): gradient ascent with each token's NLL weighted by
    ``p_t^beta1 (1 - p_t)^beta2`` (saturation x importance, :func:`weighted_ascent_term`), plus
    ``retain_weight`` x NLL(retain)."""
    beta1, beta2 = ctx.hparams["beta1"], ctx.hparams["beta2"]
    return _weighted_ascent_with_retain(params, batch, ctx, "satimp", lambda p: p**beta1 * (1.0 - p) ** beta2)


def _undial_needs(hp: Mapping[str, Any]) -> Needs:
    """The frozen teacher's forward on forget chunks; retain chunks when ``retain_weight`` > 0."""
    return Needs(retain=hp["retain_weight"] > 0, reference=True, reference_forwards=1)


@register("undial", needs=_undial_needs, beta=10.0, forget_weight=1.0, retain_weight=0.0)
def undial(params, ref_params, batch, rng, ctx: Context):
    """UNDIAL (Dong et al. 2024, arXiv 2402.10052): self-distillation on forget chunks towards the frozen original's
    distribution with the true next token's logit lowered by ``beta``, the cross-entropy ``-sum_v q_v log p_v`` with
    ``q = softmax(z_orig - beta onehot(x_{t+1}))`` per target position (a per-chunk token mean), plus
    ``retain_weight`` x NLL(retain) when > 0 (open-unlearning's default weight is 0)."""
    hidden = trained_hidden(params, batch, ctx)
    forget = ctx.split(batch, "forget")
    targets, target_mask = targets_of(forget)
    teacher = jax.lax.stop_gradient(ctx.forward(ref_params, forget))
    ce = losses.token_dampened_distillation(
        teacher,
        jax.lax.stop_gradient(ctx.model.head(ref_params)),
        hidden["forget"],
        ctx.model.head(params),
        targets,
        ctx.hparams["beta"],
        chunk_size=ctx.chunk_size,
    )
    term = mean_over_sequences(losses.sequence_mean(ce, target_mask), has_target(forget))
    loss = ctx.hparams["forget_weight"] * term
    retain_nll = lambda: retain_nll_term(params, hidden, batch, ctx)  # noqa: E731
    return with_retain_term(loss, {"undial": term}, "retain_nll", retain_nll, ctx)


@register("ce_u", needs=retain_needs(reference=False), ignore_first_tokens=1, forget_weight=1.0, retain_weight=0.0)
def cross_entropy_unlearning(params, ref_params, batch, rng, ctx: Context):
    """CE-U (Yang et al. 2025, arXiv 2503.01224): the cross-entropy of the model against its own next-token
    distribution with the true token ruled out (softmax of the logits with the target's at -inf, no gradient
    through it), a per-chunk token mean over targets, plus ``retain_weight`` x NLL(retain) when > 0 (off in the
    paper). The targets of the chunk's first ``ignore_first_tokens`` tokens are skipped, as open-unlearning skips
    the first answer tokens; token 0 is never a target, so the default 1 skips nothing in plain text."""
    hidden = trained_hidden(params, batch, ctx)
    forget = ctx.split(batch, "forget")
    targets, target_mask = targets_of(forget)
    # Target t is token t + 1: skip those whose index within the answer (the whole chunk for plain text) is below
    # ignore_first_tokens.
    first = ctx.hparams["ignore_first_tokens"] + forget.get("prompt_length", 0)
    target_mask = target_mask & (jnp.arange(targets.shape[1])[None, :] + 1 >= jnp.reshape(first, (-1, 1)))
    ce = losses.token_excluded_target_ce(hidden["forget"], ctx.model.head(params), targets, chunk_size=ctx.chunk_size)
    term = mean_over_sequences(losses.sequence_mean(ce, target_mask), target_mask.any(-1))
    loss = ctx.hparams["forget_weight"] * term
    retain_nll = lambda: retain_nll_term(params, hidden, batch, ctx)  # noqa: E731
    return with_retain_term(loss, {"ce_u": term}, "retain_nll", retain_nll, ctx)
