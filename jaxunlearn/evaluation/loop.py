"""The one evaluation loop: a jitted, sharded teacher-forced pass over batches of token sequences.

For every position it returns the log-probability of the true next token, whether that token was the argmax,
and the mean/std of the log-probabilities under the model's distribution (Min-K%++), computed chunk by chunk
along the sequence so that no ``[batch, length, vocab]`` array is kept. Perplexity, accuracy, membership
inference, multiple-choice scoring and the lm-eval adapter are all computed on the host from these arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxunlearn.models import LanguageModel, family, losses
from jaxunlearn.models.layouts import nested_get
from jaxunlearn.parallel import sharding

STAT_KEYS = ("logprob", "is_argmax", "mean", "std", "target_mask")
MOMENT_KEYS = ("mean", "std")

# On a CPU, the logits of one chunk are kept to about this many rows (positions x local batch): XLA's CPU
# fusions make several passes over a [rows, vocab] array, which run from cache at this size and from memory at
# the usual 1024-position chunks (a 2-3x slower pass over the vocabulary).
CPU_CHUNK_ROWS = 512


def _prompts(tokens: np.ndarray, prompts: np.ndarray | None) -> np.ndarray:
    """Prompt lengths ``[n]`` int32 (zeros: plain text)."""
    return np.zeros(tokens.shape[0], np.int32) if prompts is None else np.asarray(prompts, np.int32)


class Evaluator:
    """Teacher-forced statistics for any parameters of one model structure, on one mesh."""

    def __init__(
        self,
        lm: LanguageModel,
        mesh: Mesh | None = None,
        *,
        batch_size: int = 8,
        chunk_size: int = 1024,
        rules: sharding.Rules | None = None,
    ):
        self.lm = lm
        self.mesh = mesh or sharding.single_device_mesh()
        self.rules = sharding.normalize_rules(rules)
        ways = sharding.batch_ways(self.mesh, self.rules)
        self.batch_size = -(-batch_size // ways) * ways  # a multiple of the batch-parallel mesh size
        self.chunk_size = chunk_size
        self._stats_steps: dict[bool, Any] = {}
        self._grad_norm_steps: dict[float, Any] = {}
        # Programs other passes compile once for this model and mesh (the relearning attack's train step), by key.
        self.compiled: dict[Any, Any] = {}

    @classmethod
    def for_run(cls, lm: LanguageModel, mesh: Mesh, config: Any) -> Evaluator:
        """The evaluator of a run's config (``evaluation.batch_size``, ``train.logits_chunk_size``, ``mesh.rules``;
        on a CPU, chunks of at most about ``CPU_CHUNK_ROWS`` rows per device)."""
        chunk, batch = config.train.logits_chunk_size, config.evaluation.batch_size
        if mesh.devices.flat[0].platform == "cpu":
            ways = sharding.batch_ways(mesh, sharding.normalize_rules(config.mesh.rules))
            chunk = min(chunk, max(1, CPU_CHUNK_ROWS * ways // batch))
        return cls(lm, mesh, batch_size=batch, chunk_size=chunk, rules=config.mesh.rules)

    def stats_step(self, moments: bool = True):
        """The jitted statistics pass ``(params, tokens, mask) -> {logprob, is_argmax, target_mask}`` and, with
        ``moments``, ``mean`` and ``std`` (the costlier part: perplexity alone does without)."""
        if moments not in self._stats_steps:
            self._stats_steps[moments] = self._make_stats_step(moments)
        return self._stats_steps[moments]

    def _make_stats_step(self, moments: bool):
        lm, mesh, chunk, rules = self.lm, self.mesh, self.chunk_size, self.rules

        def stats(params, tokens, mask):
            with sharding.activation_sharding(mesh, rules):
                targets, target_mask = losses.next_token_targets(tokens, mask)
                hidden = lm.hidden_states(params, tokens, mask)
                out = losses.vocabulary_stats(hidden, lm.head(params), targets, chunk_size=chunk, moments=moments)
                out["target_mask"] = target_mask
                return out

        return jax.jit(stats, out_shardings=NamedSharding(mesh, P()))

    @functools.cached_property
    def _kl_step(self):
        lm, mesh, chunk, rules = self.lm, self.mesh, self.chunk_size, self.rules

        def kl(ref_params, params, tokens, mask, prompts):
            with sharding.activation_sharding(mesh, rules):
                ref_hidden = lm.hidden_states(ref_params, tokens, mask)
                hidden = lm.hidden_states(params, tokens, mask)
                per_token = losses.token_kl(ref_hidden, lm.head(ref_params), hidden, lm.head(params), chunk_size=chunk)
                return losses.sequence_mean(per_token, losses.answer_positions(mask, prompts, shift=1))

        return jax.jit(kl, out_shardings=NamedSharding(mesh, P()))

    def _make_gradient_norm_step(self, p: float):
        lm, mesh, chunk, rules = self.lm, self.mesh, self.chunk_size, self.rules
        tensors = family(lm.config).hf_tensors(lm.config)

        def tensor_norms(grads: dict) -> jax.Array:
            """The ``p``-norm of every Hugging Face tensor's gradient (a stacked parameter is one per layer)."""
            norms = []
            for entry in tensors:
                g = nested_get(grads, entry.path).astype(jnp.float32)
                g = g.reshape(g.shape[0], -1) if entry.stacked else g.reshape(1, -1)
                norms.append(jnp.linalg.norm(g, ord=p, axis=-1))
            return jnp.concatenate(norms)

        def one(params, tokens, mask, prompt):
            def mean_nll(params):
                targets, target_mask = losses.next_token_targets(tokens[None], mask[None], prompt[None])
                hidden = lm.hidden_states(params, tokens[None], mask[None])
                logp = losses.token_logprobs(hidden, lm.head(params), targets, chunk_size=chunk)
                return losses.sequence_mean(-logp, target_mask)[0]

            return jnp.mean(tensor_norms(jax.grad(mean_nll)(params)))

        unbatched = sharding.normalize_rules([(n, None if n == "batch" else a) for n, a in rules])  # one row at a time

        def norms(params, tokens, mask, prompts):
            with sharding.activation_sharding(mesh, unbatched):
                return jax.lax.map(lambda row: one(params, *row), (tokens, mask, prompts))

        replicated = NamedSharding(mesh, P())
        return jax.jit(norms, in_shardings=(None, replicated, replicated, replicated), out_shardings=replicated)

    def gradient_norms(
        self, params: dict, tokens: np.ndarray, mask: np.ndarray, p: float = 2.0, prompts: np.ndarray | None = None
    ) -> np.ndarray:
        """Per sequence, the mean over the model's (Hugging Face) parameter tensors of the ``p``-norm of the
        gradient of the sequence's mean token NLL (open-unlearning's GradNorm attack statistic), ``[n]``; only the
        answer's tokens count in question-answer chunks (``prompts``: their prompt lengths). One backward pass per
        sequence, one sequence at a time (memory: one gradient)."""
        if p not in self._grad_norm_steps:
            self._grad_norm_steps[p] = self._make_gradient_norm_step(p)
        out = [
            np.asarray(jax.device_get(self._grad_norm_steps[p](params, t, m, q)))[:rows]
            for (t, m, q), rows in self._batches(tokens, mask, _prompts(tokens, prompts), replicated=True)
        ]
        return np.concatenate(out) if out else np.zeros((0,))

    def sequence_kl(
        self, ref_params: dict, params: dict, tokens: np.ndarray, mask: np.ndarray, prompts: np.ndarray | None = None
    ) -> np.ndarray:
        """Per-sequence mean ``KL(p_ref || p)`` over non-padding positions, ``[n]`` (same model structure); in
        question-answer chunks (``prompts``: their prompt lengths) over the positions that predict the answer."""
        out = [
            np.asarray(jax.device_get(self._kl_step(ref_params, params, t, m, q)))[:rows]
            for (t, m, q), rows in self._batches(tokens, mask, _prompts(tokens, prompts))
        ]
        return np.concatenate(out) if out else np.zeros((0,))

    def _batches(self, *arrays: np.ndarray, desc: str | None = None, replicated: bool = False):
        """``(arrays, rows)``: device batches of ``batch_size`` rows of each ``[n, ...]`` array (the last one padded
        with empty rows) and their real row count; split over the batch-parallel mesh axes, or on every device
        (``replicated``)."""
        n = arrays[0].shape[0]
        bs = self.batch_size

        def spec(a: np.ndarray) -> NamedSharding:
            if replicated:
                return NamedSharding(self.mesh, P())
            axes = ("batch", "length")[: a.ndim]
            return sharding.named_sharding(axes, self.rules, self.mesh, (bs, *a.shape[1:]))

        for start in tqdm(range(0, n, bs), desc=desc, disable=None if desc else True, leave=False, unit="batch"):
            parts = [a[start : start + bs] for a in arrays]
            rows = len(parts[0])
            if rows < bs:
                parts = [np.concatenate([a, np.zeros((bs - rows, *a.shape[1:]), a.dtype)]) for a in parts]
            yield tuple(sharding.host_to_global(a, spec(a)) for a in parts), rows

    def token_stats(
        self, params: dict, tokens: np.ndarray, mask: np.ndarray, *, desc: str | None = None, moments: bool = True
    ) -> dict[str, np.ndarray]:
        """``{logprob, is_argmax, mean, std, target_mask}`` (without ``mean``/``std`` unless ``moments``), each
        ``[n, length]`` on the host.

        Position ``t`` scores token ``t + 1``; ``target_mask`` marks the positions that count.
        """
        length = tokens.shape[1]
        keys = [k for k in STAT_KEYS if moments or k not in MOMENT_KEYS]
        out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        step = self.stats_step(moments)
        for (t, m), rows in self._batches(tokens, mask, desc=desc):
            for k, v in jax.device_get(step(params, t, m)).items():
                out[k].append(np.asarray(v)[:rows])
        return {k: np.concatenate(v) if v else np.zeros((0, length)) for k, v in out.items()}

    def _bucketed_stats(self, params: dict, seqs: Sequence[Sequence[int]], width: int, desc: str | None):
        """``(i, stats of sequence i)`` for each token sequence (at most ``width`` tokens), right-padded in
        power-of-two length buckets (at most ``width``) to bound recompilation; each stats array is ``[length]``."""
        by_bucket: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            by_bucket.setdefault(min(width, 1 << max(3, (len(seq) - 1).bit_length())), []).append(i)
        for bucket, items in sorted(by_bucket.items()):
            tokens = np.zeros((len(items), bucket), np.int32)
            mask = np.zeros((len(items), bucket), np.int32)
            for row, i in enumerate(items):
                tokens[row, : len(seqs[i])] = seqs[i]
                mask[row, : len(seqs[i])] = 1
            stats = self.token_stats(params, tokens, mask, desc=desc, moments=False)
            for row, i in enumerate(items):
                yield i, {k: v[row] for k, v in stats.items()}

    def sequence_logprobs(
        self, params: dict, seqs: Sequence[Sequence[int]], *, desc: str | None = None
    ) -> list[np.ndarray]:
        """Each whole token sequence's ``log p(x_t | x_<t)`` for ``t = 1 .. n-1`` (``n - 1`` values: the first token
        is only context), as scoring one text at a time does (MUSE's ``compute_ppl``)."""
        if any(len(s) < 2 for s in seqs):
            raise ValueError("sequence_logprobs needs sequences of at least 2 tokens")
        out: list[np.ndarray] = [np.zeros(0)] * len(seqs)
        width = max((len(s) for s in seqs), default=2)
        for i, stats in self._bucketed_stats(params, seqs, width, desc):
            out[i] = np.asarray(stats["logprob"][: len(seqs[i]) - 1], np.float64)
        return out

    def score_continuations(
        self, params: dict, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, *, desc=None
    ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), continuation is the greedy one)`` for each token pair.

        As in lm-evaluation-harness, the model sees the last ``max_length`` tokens of ``context + continuation``
        that precede the final token (the final token is only a target). Sequences are bucketed by length to
        bound recompilation.
        """
        seqs, spans = [], []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"continuation {i} is empty")
            seq = (list(ctx) + list(cont))[-(max_length + 1) :]
            n_cont = min(len(cont), len(seq) - 1)
            seqs.append(seq)
            spans.append(slice(len(seq) - n_cont - 1, len(seq) - 1))  # positions predicting the continuation
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for i, stats in self._bucketed_stats(params, seqs, max_length + 1, desc):
            results[i] = (float(stats["logprob"][spans[i]].sum()), bool(stats["is_argmax"][spans[i]].all()))
        return results  # type: ignore[return-value]
