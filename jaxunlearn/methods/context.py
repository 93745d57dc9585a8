"""What objectives share: the run context (model functions, hyper-parameters, run constants) and the
normalisation helpers every loss uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.methods.registry import Array, Split, method_hparams, resolve_needs
from jaxunlearn.models import LanguageModel, losses


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
