"""Which chunks go into which optimizer step: a pure function of (seed, step).

A step holds ``grad_accum_steps`` micro-batches of ``micro_batch_size`` forget chunks (and, for methods with a
retain term, as many retain chunks: the paper's 1:1 mix): their tokens, mask, chunk ids and prompt lengths (0 for
plain text; a question-answer chunk's loss counts its answer only). Forget chunks are visited once per epoch in an order
shuffled by ``(seed, epoch)``; retain chunks are drawn from their own shuffled stream, cycling over the whole
retain set. Because the batch of step ``s`` depends only on ``s``, a resumed run sees exactly the data an
uninterrupted run would have seen, with no iterator state to save.

With a second forget topic (``forget2``, RMU on WMDP: the official ``rmu/unlearn.py`` schedule) step ``s`` takes
topic ``s % 2`` (``forget``, then ``forget2``) and that topic's batch ``s // 2``, and the retain batch ``s // 2``:
every batch in file order, no shuffling; each topic's batches, and the retain set, start over when used up. Both
splits then carry ``topic``, the step's topic index, for per-topic hyper-parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxunlearn.data.arrays import Chunks
from jaxunlearn.data.source import DataError

_RETAIN_STREAM = 1


@dataclasses.dataclass(frozen=True)
class StepBatcher:
    forget: Chunks
    retain: Chunks | None
    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    forget2: Chunks | None = None  # a second forget topic: alternate topics, batches in file order

    def __post_init__(self) -> None:
        for name, chunks in (("forget", self.forget), ("forget2", self.forget2)):
            if chunks is not None and len(chunks) < self.chunks_per_step:
                raise DataError(
                    f"the {name} set has {len(chunks)} chunks but one step takes micro_batch_size x grad_accum_steps "
                    f"= {self.chunks_per_step}; lower train.grad_accum_steps or train.micro_batch_size"
                )
        if self.forget2 is not None and self.forget2.tokens.shape[1] != self.forget.tokens.shape[1]:
            raise DataError("the two forget topics' chunks must have one width (Chunks.widened)")

    @property
    def topics(self) -> tuple[Chunks, ...]:
        return (self.forget,) if self.forget2 is None else (self.forget, self.forget2)

    @property
    def chunks_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def steps_per_epoch(self) -> int:
        """Full steps per pass over the forget set (a last partial step is dropped, as HF Trainer does); with two
        topics, two per full batch of the smaller topic."""
        return len(self.topics) * min(len(c) // self.chunks_per_step for c in self.topics)

    def topic(self, step: int) -> int:
        """The forget topic of step ``step``: 0 (``forget``) or, with two topics, 1 (``forget2``) every other step."""
        return step % len(self.topics)

    def _order(self, n: int, stream: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, stream, epoch]).permutation(n)

    def _in_order(self, n: int, batch: int) -> np.ndarray:
        """Batch ``batch`` of ``n`` chunks in file order, starting over at the first full batch past the end."""
        start = batch % (n // self.chunks_per_step) * self.chunks_per_step
        return np.arange(start, start + self.chunks_per_step)

    def forget_indices(self, step: int) -> np.ndarray:
        """Indices into the forget set of ``step``'s topic (:meth:`topic`)."""
        if self.forget2 is not None:
            return self._in_order(len(self.topics[self.topic(step)]), step // 2)
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(len(self.forget), 0, epoch)
        return order[within * self.chunks_per_step : (within + 1) * self.chunks_per_step]

    def retain_indices(self, step: int) -> np.ndarray:
        assert self.retain is not None
        n = len(self.retain)
        if self.forget2 is not None:  # retain batch step // 2, in order, cycling over the whole retain set
            return (step // 2 * self.chunks_per_step + np.arange(self.chunks_per_step)) % n
        positions = step * self.chunks_per_step + np.arange(self.chunks_per_step)
        out = np.empty(self.chunks_per_step, dtype=np.int64)
        for epoch in np.unique(positions // n):
            sel = positions // n == epoch
            out[sel] = self._order(n, _RETAIN_STREAM, int(epoch))[positions[sel] % n]
        return out

    def _split(self, chunks: Chunks, idx: np.ndarray) -> dict[str, np.ndarray]:
        shape = (self.grad_accum_steps, self.micro_batch_size)
        return {
            "tokens": chunks.tokens[idx].reshape(*shape, -1),
            "mask": (np.arange(chunks.tokens.shape[1]) < chunks.lengths[idx][:, None])
            .astype(np.int32)
            .reshape(*shape, -1),
            "chunk_id": idx.astype(np.int32).reshape(shape),
            "prompt_length": chunks.prompts[idx].astype(np.int32).reshape(shape),
        }

    @staticmethod
    def abstract_batch(
        micro_batch_size: int, grad_accum_steps: int, length: int, *, retain: bool, topics: bool = False
    ) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
        """The shapes and dtypes :meth:`batch` returns, without data (for ahead-of-time compilation)."""
        shape = (grad_accum_steps, micro_batch_size)
        split = {
            "tokens": jax.ShapeDtypeStruct((*shape, length), np.int32),
            "mask": jax.ShapeDtypeStruct((*shape, length), np.int32),
            "chunk_id": jax.ShapeDtypeStruct(shape, np.int32),
            "prompt_length": jax.ShapeDtypeStruct(shape, np.int32),
            **({"topic": jax.ShapeDtypeStruct(shape, np.int32)} if topics else {}),
        }
        return {"forget": split, **({"retain": dict(split)} if retain else {})}

    def batch(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """``{"forget": ..., "retain": ...}``, each ``[grad_accum_steps, micro_batch_size, ...]``; with two topics
        each also has ``topic`` (the step's, every row) and forget ``chunk_id`` counts on past the first topic's."""
        topic = self.topic(step)
        index = self.forget_indices(step)
        out = {"forget": self._split(self.topics[topic], index)}
        if self.retain is not None:
            out["retain"] = self._split(self.retain, self.retain_indices(step))
        if self.forget2 is not None:
            out["forget"]["chunk_id"] = out["forget"]["chunk_id"] + np.int32(topic * len(self.forget))
            for split in out.values():
                split["topic"] = np.full(split["chunk_id"].shape, topic, np.int32)
        return out
