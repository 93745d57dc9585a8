"""Which chunks go into which optimizer step: a pure function of (seed, step).

A step holds ``grad_accum_steps`` micro-batches of ``micro_batch_size`` forget chunks (and, for methods with a
retain term, as many retain chunks: the paper's 1:1 mix): their tokens, mask, chunk ids and prompt lengths (0 for
plain text; a question-answer chunk's loss counts its answer only). Forget chunks are visited once per epoch in an order
shuffled by ``(seed, epoch)``; retain chunks are drawn from their own shuffled stream, cycling over the whole
retain set. Because the batch of step ``s`` depends only on ``s``, a resumed run sees exactly the data an
uninterrupted run would have seen, with no iterator state to save.
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

    def __post_init__(self) -> None:
        if len(self.forget) < self.chunks_per_step:
            raise DataError(
                f"the forget set has {len(self.forget)} chunks but one step takes micro_batch_size x "
                f"grad_accum_steps = {self.chunks_per_step}; lower train.grad_accum_steps or train.micro_batch_size"
            )

    @property
    def chunks_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def steps_per_epoch(self) -> int:
        """Full steps per pass over the forget set (a last partial step is dropped, as HF Trainer does)."""
        return len(self.forget) // self.chunks_per_step

    def _order(self, n: int, stream: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, stream, epoch]).permutation(n)

    def forget_indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(len(self.forget), 0, epoch)
        return order[within * self.chunks_per_step : (within + 1) * self.chunks_per_step]

    def retain_indices(self, step: int) -> np.ndarray:
        assert self.retain is not None
        n = len(self.retain)
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
        micro_batch_size: int, grad_accum_steps: int, length: int, *, retain: bool
    ) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
        """The shapes and dtypes :meth:`batch` returns, without data (for ahead-of-time compilation)."""
        shape = (grad_accum_steps, micro_batch_size)
        split = {
            "tokens": jax.ShapeDtypeStruct((*shape, length), np.int32),
            "mask": jax.ShapeDtypeStruct((*shape, length), np.int32),
            "chunk_id": jax.ShapeDtypeStruct(shape, np.int32),
            "prompt_length": jax.ShapeDtypeStruct(shape, np.int32),
        }
        return {"forget": split, **({"retain": dict(split)} if retain else {})}

    def batch(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """``{"forget": ..., "retain": ...}``, each ``[grad_accum_steps, micro_batch_size, ...]``."""
        out = {"forget": self._split(self.forget, self.forget_indices(step))}
        if self.retain is not None:
            out["retain"] = self._split(self.retain, self.retain_indices(step))
        return out
