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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import losses
from jaxunlearn.models import LanguageModel

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


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: Objective
    hparams: Mapping[str, Any]  # defaults, overridable as config.method.<name>
    decide: Callable[[Mapping[str, Any]], Needs]
    summary: str

    def needs(self, hparams: Mapping[str, Any] | None = None) -> Needs:
        """This method's inputs under ``hparams`` (the defaults merged with the given values)."""
        return self.decide({**self.hparams, **(hparams or {})})


METHODS: dict[str, Method] = {}


def register(name: str, *, needs: Needs | Callable[[Mapping[str, Any]], Needs] = Needs(), **hparams: Any):
    """Register an objective under ``name`` with its default hyper-parameters (overridable in config).

    ``needs`` is a :class:`Needs` or a function of the hyper-parameters returning one.
    """

    def decide(hp: Mapping[str, Any]) -> Needs:
        return needs(hp) if callable(needs) else needs

    def decorate(fn: Objective) -> Objective:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, fn, dict(hparams), decide, summary)
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

    def forward(self, params: dict, split: Split) -> Array:
        """Final hidden states ``[batch, length, embed]`` of one split; a split with no rows costs nothing (the
        train step's per-split passes give the other splits zero rows)."""
        tokens = split["tokens"]
        if tokens.shape[0] == 0:
            return jnp.zeros((0, tokens.shape[1], self.model.config.hidden_size), self.model.config.dtype)
        return self.model.hidden_states(params, tokens, split["mask"])

    def hidden(self, params: dict, *splits: Split) -> tuple[Array, ...]:
        """Final hidden states of each split, from one forward pass over all their rows.

        One pass instead of one per split means one backward pass through the layers, so the layers' gradients
        are produced once per micro-batch, not once per split. Rows are interleaved (forget 0, retain 0, forget 1,
        ...) so every device keeps its own rows of each split and nothing moves between devices.
        """
        if len({s["tokens"].shape for s in splits}) > 1 or len(splits) == 1 or not splits[0]["tokens"].shape[0]:
            return tuple(self.forward(params, s) for s in splits)
        n, b = len(splits), splits[0]["tokens"].shape[0]

        def rows(key: str) -> Array:
            return jnp.stack([s[key] for s in splits], axis=1).reshape(b * n, -1)

        hidden = self.model.hidden_states(params, rows("tokens"), rows("mask"))
        hidden = hidden.reshape(b, n, *hidden.shape[1:])
        return tuple(hidden[:, i] for i in range(n))

    def nll_of_hidden(self, params: dict, hidden: Array, split: Split, targets: Array | None = None) -> Array:
        """Per-sequence mean NLL ``[batch]`` of ``targets`` (default: the true next tokens) from hidden states."""
        true_targets, target_mask = losses.next_token_targets(split["tokens"], split["mask"])
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
        return losses.sequence_mean(kl, split["mask"])

    def mean_kl_of_hidden(self, params: dict, hidden: Array, ref_params: dict, split: Split) -> Array:
        """The mean over non-empty sequences of :meth:`kl_of_hidden`."""
        return mean_over_sequences(self.kl_of_hidden(params, hidden, ref_params, split), split["mask"].any(-1))

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


def has_target(split: Split) -> Array:
    """``[batch]`` bool: the sequence has at least one next-token target (two real tokens)."""
    return losses.next_token_targets(split["tokens"], split["mask"])[1].any(-1)


# --- the paper's methods ----------------------------------------------------------------------------------


# The capped ascent's settings (:func:`ascent_term`), shared by the gradient-ascent methods; 0 = off.
CAP_HPARAMS = {"forget_nll_cap": 0.0, "forget_nll_cap_margin": 0.0}


def ascent_term(seq_nll: Array, valid: Array, ctx: Context) -> Array:
    """The forget term gradient ascent maximises: the mean over chunks of the per-chunk NLL, each capped at
    ``forget_nll_cap`` nats when that is > 0 (0, the default, is the paper's uncapped ascent). A run with
    ``forget_nll_cap_margin`` > 0 sets the cap before training to the original model's mean chunk NLL on the
    approximate (unseen) split plus that margin (:func:`jaxunlearn.engine.resolve_method`).

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

    def decide(hp: Mapping[str, Any]) -> Needs:
        retain = hp["retain_weight"] > 0
        uses_reference = reference and retain
        return Needs(retain=retain, reference=uses_reference, reference_forwards=int(uses_reference))

    return decide


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
    true_targets, _ = losses.next_token_targets(split["tokens"], split["mask"])
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

    def decide(hp: Mapping[str, Any]) -> Needs:
        retain = hp["retain_weight"] > 0
        return Needs(retain=retain, reference=True, reference_forwards=1 + int(retain and retain_kl))

    return decide


def npo_term(
    params: dict, ref_params: dict, hidden: Array, forget: Split, ctx: Context
) -> tuple[Array, dict[str, Array]]:
    """``-(2/beta) log sigmoid(-beta (log p(x) - log p_ref(x)))`` averaged over forget chunks, with sequence
    log-likelihoods summed over tokens (``hidden``: the trained model's hidden states on ``forget``)."""
    _, target_mask = losses.next_token_targets(forget["tokens"], forget["mask"])
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
    targets, target_mask = losses.next_token_targets(forget["tokens"], forget["mask"])
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
