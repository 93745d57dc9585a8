"""Unlearning objectives: one short pure function per method, registered by name.

Every objective has the signature ``(params, ref_params, batch, rng, ctx) -> (loss, metrics)``:

* ``params``: the trainable parameters; ``ref_params``: the frozen original model (``None`` unless the method's
  :class:`Needs` say ``reference``);
* ``batch``: ``{"forget": split, "retain": split}`` where a split is ``{"tokens", "mask", "chunk_id"}`` with
  ``[batch, length]`` right-padded arrays (``retain`` only when the :class:`Needs` say ``retain``);
* ``rng``: a per-step PRNG key; ``ctx``: the model functions, the method's hyper-parameters and run constants.

A method declares what it reads as a function of its hyper-parameters (``register(..., needs=...)``): e.g. NPO
reads retain chunks only with ``retain_weight > 0``. Data preparation, the train step and the compute
accounting all follow that one answer, so a term is never silently dropped for lack of data.

Normalisation follows the official code: a *per-sequence token mean* of the per-token quantity over the
sequence's valid positions, then the *mean over sequences that have a target* (a chunk with nothing to score
does not count as a zero); padding never counts. The loss is minimised, so ascent terms enter with a minus
sign. Adding a method means adding one function here and one config file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import require
from jaxunlearn.models import LanguageModel, abstract_model, family, losses
from jaxunlearn.models.layouts import nested_get

Array = jax.Array
Split = Mapping[str, Array]
Objective = Callable[..., tuple[Array, dict[str, Array]]]

# Stream id folded into the run seed for random labels, so they never collide with other uses of the seed.
_RANDOM_LABEL_STREAM = 0x5EED


@dataclasses.dataclass(frozen=True)
class Needs:
    """What one run of a method reads, decided from its resolved hyper-parameters.

    Data preparation (which splits to load), the train step (which arrays it receives) and the compute
    accounting (how many forward passes a step costs) all read this one answer.
    """

    retain: bool = False  # retain chunks in every step (as many as forget chunks)
    reference: bool = False  # the frozen original model
    reference_forwards: int = 0  # reference-model forward passes per forget chunk of a step
    extras: frozenset[str] = frozenset()  # run constants from EXTRAS, e.g. "label_ids"


# ``trainable(hparams, model_config)``: which parameters the optimizer updates, as a tree shaped like the params
# whose leaves broadcast against them (``[layers, 1, ...]`` for stacked layers), 1.0 = trained, 0.0 = frozen.
Trainable = Callable[[Mapping[str, Any], Any], dict]
# ``transform(params, ref_params, hparams)``: the unlearned model as a function of the trained parameters and the
# frozen original (task vectors: the original minus the scaled fine-tuning difference).
Transform = Callable[[dict, dict, Mapping[str, Any]], dict]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: Objective
    hparams: Mapping[str, Any]  # defaults, overridable as config.method.<name>
    needs_rule: Callable[[Mapping[str, Any]], Needs]  # register(needs=...) as a function of the hyper-parameters
    summary: str
    trainable: Trainable | None = None  # None: every parameter is trained
    transform: Transform | None = None  # None: the trained parameters are the unlearned model
    # ``check(hparams, model_config)`` raises ValueError for hyper-parameters that cannot work on this model
    # (e.g. a layer it does not have); called before any compute.
    check: Callable[[Mapping[str, Any], Any], None] | None = None

    def needs(self, hparams: Mapping[str, Any] | None = None) -> Needs:
        """This method's inputs under ``hparams`` (the defaults merged with the given values)."""
        return self.needs_rule({**self.hparams, **(hparams or {})})


METHODS: dict[str, Method] = {}


def register(
    name: str,
    *,
    needs: Needs | Callable[[Mapping[str, Any]], Needs] = Needs(),
    trainable: Trainable | None = None,
    transform: Transform | None = None,
    check: Callable[[Mapping[str, Any], Any], None] | None = None,
    **hparams: Any,
):
    """Register an objective under ``name`` with its default hyper-parameters (overridable in config).

    ``needs`` is a :class:`Needs` or a function of the hyper-parameters returning one; ``trainable``,
    ``transform`` and ``check`` are the optional parts of :class:`Method`.
    """

    def needs_rule(hp: Mapping[str, Any]) -> Needs:
        return needs(hp) if callable(needs) else needs

    def decorate(fn: Objective) -> Objective:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, fn, dict(hparams), needs_rule, summary, trainable, transform, check)
        return fn

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown unlearning method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_hparams(method_config: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters of a ``config.method`` section (everything but ``name``), defaults filled in."""
    method = get_method(method_config["name"])
    return {**method.hparams, **{k: v for k, v in method_config.items() if k != "name"}}


def resolve_needs(method_config: Mapping[str, Any]) -> Needs:
    """What the method of a ``config.method`` section needs under its hyper-parameters."""
    return get_method(method_config["name"]).needs(method_hparams(method_config))


def non_special_ids(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """The tokenizer's ids that are not special tokens (and fit the model's vocabulary); every id of the
    vocabulary without a tokenizer (planning a run compiles the same step from shapes alone)."""
    if tokenizer is None:
        return np.arange(vocab_size, dtype=np.int32)
    special = set(tokenizer.all_special_ids)
    return np.asarray([i for i in range(min(len(tokenizer), vocab_size)) if i not in special], dtype=np.int32)


# Run constants a method may ask for in ``Needs.extras``: name -> f(tokenizer, model config).
EXTRAS: dict[str, Callable[[Any, Any], Any]] = {
    "label_ids": lambda tokenizer, model_config: non_special_ids(tokenizer, model_config.vocab_size),
}


@dataclasses.dataclass(frozen=True)
class Context:
    """What objectives need besides arrays: model functions, hyper-parameters and run constants."""

    model: LanguageModel
    hparams: Mapping[str, Any]
    seed: int = 0
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    chunk_size: int = 1024

    @classmethod
    def for_run(
        cls, model: LanguageModel, method_config: Mapping[str, Any], *, seed: int, tokenizer: Any, chunk_size: int
    ) -> Context:
        """The context of a run: resolved hyper-parameters and the extras its method needs."""
        needs = resolve_needs(method_config)
        extras = {name: EXTRAS[name](tokenizer, model.config) for name in sorted(needs.extras)}
        return cls(model, method_hparams(method_config), seed=seed, extras=extras, chunk_size=chunk_size)

    def split(self, batch: Mapping[str, Split], name: str) -> Split:
        """``batch[name]``, or an error saying which term's data is missing (a method declared it)."""
        if name not in batch:
            raise ValueError(
                f"the objective needs {name!r} chunks but the batch has only {sorted(batch)}: its method's "
                "Needs and its loss disagree"
            )
        return batch[name]

    def _states(self, params: dict, tokens: Array, mask: Array, upto: int | None) -> Array:
        if upto is None:
            return self.model.hidden_states(params, tokens, mask)
        return self.model.residual_stream(params, tokens, mask, upto)

    def forward(self, params: dict, split: Split, *, upto: int | None = None) -> Array:
        """Final hidden states ``[batch, length, embed]`` of one split (with ``upto``: the residual stream after
        the first ``upto`` layers, :meth:`LanguageModel.residual_stream`); a split with no rows costs nothing
        (the train step's per-split passes give the other splits zero rows)."""
        tokens = split["tokens"]
        if tokens.shape[0] == 0:
            return jnp.zeros((0, tokens.shape[1], self.model.config.hidden_size), self.model.config.dtype)
        return self._states(params, tokens, split["mask"], upto)

    def hidden(self, params: dict, *splits: Split, upto: int | None = None) -> tuple[Array, ...]:
        """Final hidden states of each split (or the residual stream after ``upto`` layers), from one forward
        pass over all their rows.

        One pass instead of one per split means one backward pass through the layers, so the layers' gradients
        are produced once per micro-batch, not once per split. Rows are interleaved (forget 0, retain 0, forget 1,
        ...) so every device keeps its own rows of each split and nothing moves between devices.
        """
        if len({s["tokens"].shape for s in splits}) > 1 or len(splits) == 1 or not splits[0]["tokens"].shape[0]:
            return tuple(self.forward(params, s, upto=upto) for s in splits)
        n, b = len(splits), splits[0]["tokens"].shape[0]

        def rows(key: str) -> Array:
            return jnp.stack([s[key] for s in splits], axis=1).reshape(b * n, -1)

        hidden = self._states(params, rows("tokens"), rows("mask"), upto)
        hidden = hidden.reshape(b, n, *hidden.shape[1:])
        return tuple(hidden[:, i] for i in range(n))

    def nll_of_hidden(self, params: dict, hidden: Array, split: Split, targets: Array | None = None) -> Array:
        """Per-sequence mean NLL ``[batch]`` of ``targets`` (default: the true next tokens) from hidden states."""
        true_targets, target_mask = targets_of(split)
        targets = true_targets if targets is None else targets
        logp = losses.token_logprobs(hidden, self.model.head(params), targets, chunk_size=self.chunk_size)
        return losses.sequence_mean(-logp, target_mask)

    def nll(self, params: dict, split: Split, targets: Array | None = None) -> Array:
        """Per-sequence mean NLL ``[batch]`` of ``targets`` (default: the true next tokens)."""
        (hidden,) = self.hidden(params, split)
        return self.nll_of_hidden(params, hidden, split, targets)

    def mean_nll(self, params: dict, split: Split, targets: Array | None = None) -> Array:
        """The mean over sequences of :meth:`nll`, counting only sequences that have a target."""
        return mean_over_sequences(self.nll(params, split, targets), has_target(split))

    def kl_of_hidden(self, params: dict, hidden: Array, ref_params: dict, split: Split) -> Array:
        """Per-sequence mean ``KL(p_ref || p)`` ``[batch]`` over the non-padding positions, from the trained
        model's hidden states on ``split``."""
        ref_hidden = self.forward(ref_params, split)
        kl = losses.token_kl(
            jax.lax.stop_gradient(ref_hidden),
            jax.lax.stop_gradient(self.model.head(ref_params)),
            hidden,
            self.model.head(params),
            chunk_size=self.chunk_size,
        )
        return losses.sequence_mean(kl, scored_positions(split, shift=1))

    def mean_kl_of_hidden(self, params: dict, hidden: Array, ref_params: dict, split: Split) -> Array:
        """The mean over non-empty sequences of :meth:`kl_of_hidden`."""
        valid = scored_positions(split, shift=1).any(-1)
        return mean_over_sequences(self.kl_of_hidden(params, hidden, ref_params, split), valid)

    def mean_kl(self, params: dict, ref_params: dict, split: Split) -> Array:
        """The mean over non-empty sequences of ``KL(p_ref || p)`` on ``split``."""
        (hidden,) = self.hidden(params, split)
        return self.mean_kl_of_hidden(params, hidden, ref_params, split)


def mean_over_sequences(values: Array, valid: Array) -> Array:
    """Mean of per-sequence ``values`` over the sequences marked ``valid`` (0 when none is).

    A chunk with nothing to score (a single token has no next-token target) must not count as a zero.
    """
    weights = valid.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def targets_of(split: Split) -> tuple[Array, Array]:
    """``(targets, target_mask)`` of a split's chunks: the next tokens, scored only in the answer of a
    question-answer chunk (its ``prompt_length`` first tokens are context; :func:`losses.next_token_targets`)."""
    return losses.next_token_targets(split["tokens"], split["mask"], split.get("prompt_length"))


def scored_positions(split: Split, shift: int) -> Array:
    """``[batch, length]`` bool: the non-padding positions of a split's chunks outside a question-answer chunk's
    prompt (``shift=0``: the answer's tokens; ``shift=1``: the positions that predict them; plain text: all)."""
    return losses.answer_positions(split["mask"], split.get("prompt_length"), shift=shift)


def has_target(split: Split) -> Array:
    """``[batch]`` bool: the sequence has at least one next-token target (two real tokens)."""
    return targets_of(split)[1].any(-1)


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


def _with_retain_term(loss: Array, metrics: dict, name: str, value: Callable[[], Array], ctx: Context):
    """Add ``retain_weight x value()`` when the weight is > 0 (a zero weight drops the term and its data)."""
    weight = ctx.hparams["retain_weight"]
    if not weight:
        return loss, metrics
    term = value()
    return loss + weight * term, {**metrics, name: term}


def _retain_needs(reference: bool) -> Callable[[Mapping[str, Any]], Needs]:
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


def _retain_nll(params: dict, hidden: Mapping[str, Array], batch: Mapping[str, Split], ctx: Context) -> Array:
    retain = ctx.split(batch, "retain")
    return mean_over_sequences(ctx.nll_of_hidden(params, hidden["retain"], retain), has_target(retain))


def _retain_kl(params, ref_params, hidden: Mapping[str, Array], batch: Mapping[str, Split], ctx: Context) -> Array:
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


@register("ga_gd", needs=_retain_needs(reference=False), forget_weight=1.0, retain_weight=1.0, **CAP_HPARAMS)
def ga_gd(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent on forget chunks plus gradient descent on retain chunks."""
    hidden = trained_hidden(params, batch, ctx)
    loss, metrics = ascent_loss(params, hidden["forget"], ctx.split(batch, "forget"), ctx)
    loss = ctx.hparams["forget_weight"] * loss
    return _with_retain_term(loss, metrics, "retain_nll", lambda: _retain_nll(params, hidden, batch, ctx), ctx)


@register("ga_kl", needs=_retain_needs(reference=True), forget_weight=1.0, retain_weight=1.0, **CAP_HPARAMS)
def ga_kl(params, ref_params, batch, rng, ctx: Context):
    """Gradient ascent on forget chunks plus KL(original || current) on retain chunks."""
    hidden = trained_hidden(params, batch, ctx)
    loss, metrics = ascent_loss(params, hidden["forget"], ctx.split(batch, "forget"), ctx)
    loss = ctx.hparams["forget_weight"] * loss
    retain_kl = lambda: _retain_kl(params, ref_params, hidden, batch, ctx)  # noqa: E731
    return _with_retain_term(loss, metrics, "retain_kl", retain_kl, ctx)


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
    retain_kl = lambda: _retain_kl(params, ref_params, hidden, batch, ctx)  # noqa: E731
    return _with_retain_term(loss, metrics, "retain_kl", retain_kl, ctx)


@register("npo_gd", needs=_npo_needs(retain_kl=False), beta=0.1, forget_weight=1.0, retain_weight=1.0)
def npo_gd(params, ref_params, batch, rng, ctx: Context):
    """NPO on forget chunks plus gradient descent on retain chunks (open-unlearning's and MUSE's NPO_GDR)."""
    hidden = trained_hidden(params, batch, ctx)
    npo, metrics = npo_term(params, ref_params, hidden["forget"], ctx.split(batch, "forget"), ctx)
    loss = ctx.hparams["forget_weight"] * npo
    return _with_retain_term(loss, metrics, "retain_nll", lambda: _retain_nll(params, hidden, batch, ctx), ctx)


@register("simnpo", needs=_retain_needs(reference=False), beta=4.5, gamma=0.0, forget_weight=1.0, retain_weight=1.0)
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
    return _with_retain_term(loss, metrics, "retain_nll", lambda: _retain_nll(params, hidden, batch, ctx), ctx)


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
    return _with_retain_term(loss, metrics, "retain_nll", lambda: _retain_nll(params, hidden, batch, ctx), ctx)


@register("wga", needs=_retain_needs(reference=False), beta=1.0, forget_weight=1.0, retain_weight=1.0)
def weighted_gradient_ascent(params, ref_params, batch, rng, ctx: Context):
    """WGA (Wang et al. 2025, arXiv 2502.19301): gradient ascent with each token's NLL weighted by ``p_t^beta``, so
    tokens already unlikely stop pulling (:func:`weighted_ascent_term`), plus ``retain_weight`` x NLL(retain)."""
    beta = ctx.hparams["beta"]
    return _weighted_ascent_with_retain(params, batch, ctx, "wga", lambda p: p**beta)


@register("satimp", needs=_retain_needs(reference=False), beta1=5.0, beta2=1.0, forget_weight=1.0, retain_weight=1.0)
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
    retain_nll = lambda: _retain_nll(params, hidden, batch, ctx)  # noqa: E731
    return _with_retain_term(loss, {"undial": term}, "retain_nll", retain_nll, ctx)


@register("ce_u", needs=_retain_needs(reference=False), ignore_first_tokens=1, forget_weight=1.0, retain_weight=0.0)
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
    retain_nll = lambda: _retain_nll(params, hidden, batch, ctx)  # noqa: E731
    return _with_retain_term(loss, {"ce_u": term}, "retain_nll", retain_nll, ctx)


# --- RMU: steer one layer's activations, train a few parameters -----------------------------------------------

# Stream id folded into the run seed for RMU's random direction.
_RMU_STREAM = 0x7E0


def control_vector(hidden_size: int, seed: int, steering_coeff: float) -> Array:
    """RMU's target activation ``c u``: ``u`` uniform in ``[0, 1)^d`` and normalised (the official ``torch.rand``
    direction, in the positive orthant), fixed for the run by its seed, ``c`` the steering coefficient."""
    u = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), _RMU_STREAM), (hidden_size,), jnp.float32)
    return steering_coeff * u / jnp.linalg.norm(u)


def activation_mse(activations: Array, target: Array, mask: Array) -> Array:
    """Per-sequence ``[batch]`` mean over non-padding positions of the mean over the hidden dimension of the
    squared difference (open-unlearning's masked RMU loss; the official code averages over padding too)."""
    squared = jnp.mean(jnp.square(activations.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return losses.sequence_mean(squared, mask)


def parameter_mask(model_config: Any, pattern: str) -> dict:
    """1.0 for the parameters whose Hugging Face tensor name fully matches the regular expression ``pattern``, else
    0.0, per layer for stacked parameters: a tree shaped like the params, leaves ``[layers, 1, ...]`` or scalars."""
    from flax import nnx

    regex = re.compile(pattern)
    _, abstract = nnx.split(abstract_model(model_config), nnx.Param)
    shapes = abstract.to_pure_dict()
    mask: dict = {}
    for entry in family(model_config).hf_tensors(model_config):
        ndim = len(nested_get(shapes, entry.path).shape)
        if entry.stacked:
            layers = [regex.fullmatch(entry.name.format(layer=i)) is not None for i in range(model_config.num_layers)]
            value = np.asarray(layers, np.float32).reshape(-1, *([1] * (ndim - 1)))
        else:
            value = np.float32(regex.fullmatch(entry.name) is not None)
        parent = mask
        for key in entry.path[:-1]:
            parent = parent.setdefault(key, {})
        parent[entry.path[-1]] = value
    return mask


def _rmu_trainable(hp: Mapping[str, Any], model_config: Any) -> dict:
    return parameter_mask(model_config, hp["trainable_params"])


def _rmu_check(hp: Mapping[str, Any], model_config: Any) -> None:
    """The steered layer exists; ``trainable_params`` is a regular expression that selects a parameter the loss
    reaches (the embedding, or one in a layer up to the steered one: the forward pass stops there)."""

    layer, layers, pattern = hp["layer"], model_config.num_layers, hp["trainable_params"]
    if layer >= layers:
        raise ValueError(f"config.method.layer={layer}: the model has layers 0 to {layers - 1}")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"config.method.trainable_params={pattern!r}: not a regular expression ({e})") from None
    reached = []
    for entry in family(model_config).hf_tensors(model_config):
        if entry.stacked:
            reached += [entry.name.format(layer=i) for i in range(layer + 1)]
        elif entry.path == ("embedding",):
            reached.append(entry.name)
    if not any(regex.fullmatch(name) for name in reached):
        raise ValueError(
            f"config.method.trainable_params={pattern!r}: matches no parameter in layers 0 to {layer} (the "
            "Hugging Face tensor names, e.g. model.layers.0.mlp.down_proj.weight)"
        )


@register(
    "rmu",
    needs=_retain_needs(reference=True),
    trainable=_rmu_trainable,
    check=_rmu_check,
    layer=7,
    trainable_params=r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight",
    steering_coeff=20.0,
    forget_weight=1.0,
    retain_weight=100.0,
)
def representation_misdirection(params, ref_params, batch, rng, ctx: Context):
    """RMU (Li et al. 2024, arXiv 2403.03218): push the residual stream after decoder layer ``layer`` on forget
    chunks to ``steering_coeff x u`` (a fixed random unit vector, :func:`control_vector`) and keep it equal to the
    frozen original's on retain chunks (weight ``retain_weight``, the paper's alpha), both as
    :func:`activation_mse`; only the parameters ``trainable_params`` selects are updated (official defaults: the
    MLP down-projections of layers 5-7, loss at layer 7). Only the layers up to ``layer`` run."""
    upto = ctx.hparams["layer"] + 1
    names = ("forget", "retain") if ctx.hparams["retain_weight"] else ("forget",)
    splits = [ctx.split(batch, name) for name in names]
    activations = dict(zip(names, ctx.hidden(params, *splits, upto=upto)))
    forget = splits[0]
    control = control_vector(ctx.model.config.hidden_size, ctx.seed, ctx.hparams["steering_coeff"])
    positions = scored_positions(forget, shift=0)
    term = mean_over_sequences(activation_mse(activations["forget"], control, positions), positions.any(-1))
    loss = ctx.hparams["forget_weight"] * term

    def retain_term() -> Array:
        retain = ctx.split(batch, "retain")
        frozen = jax.lax.stop_gradient(ctx.forward(ref_params, retain, upto=upto))
        positions = scored_positions(retain, shift=0)
        return mean_over_sequences(activation_mse(activations["retain"], frozen, positions), positions.any(-1))

    return _with_retain_term(loss, {"rmu_forget": term}, "rmu_retain", retain_term, ctx)


# --- task-vector negation -------------------------------------------------------------------------------------


def negated_task_vector(params: dict, ref_params: dict, hp: Mapping[str, Any]) -> dict:
    """``theta_0 - alpha (theta - theta_0)``: the original minus ``alpha`` x the fine-tuning difference, in the
    trained parameters' dtype."""
    alpha = hp["alpha"]

    def negate(p: Array, r: Array) -> Array:
        r = r.astype(p.dtype)
        return r - alpha * (p - r)

    return jax.tree.map(negate, params, ref_params)


@register("task_vector", needs=Needs(reference=True), transform=negated_task_vector, alpha=1.0)
def task_vector(params, ref_params, batch, rng, ctx: Context):
    """Task-vector negation (Ilharco et al. 2023, arXiv 2212.04089; MUSE's ``tv`` baseline): fine-tune on the forget
    chunks (gradient descent on their NLL); the unlearned model is the original minus ``alpha`` x the difference
    the fine-tuning made (:func:`negated_task_vector`), which every evaluation, the stopping rule and the export
    see. The train state holds the fine-tuned copy."""
    nll = ctx.mean_nll(params, ctx.split(batch, "forget"))
    return nll, {"forget_nll": nll}


def check_config(method: Mapping[str, Any]) -> None:
    """The ``method`` section: a known method with non-negative hyper-parameters (the forget-NLL cap given once).
    Whether the data the method needs is there is a question across sections (:mod:`jaxunlearn.config.validation`)."""
    name = method["name"]
    require(name in METHODS, "config.method.name", name, f"unknown method; known: {', '.join(sorted(METHODS))}")
    for hp, value in method.items():
        if hp != "name" and isinstance(value, (int, float)):
            require(value >= 0, f"config.method.{hp}", value, "must be >= 0")
    margin = method.get("forget_nll_cap_margin", 0.0)
    if margin:
        key = "config.method.forget_nll_cap_margin"
        require(not method["forget_nll_cap"], key, margin, "give forget_nll_cap or its margin, not both")
