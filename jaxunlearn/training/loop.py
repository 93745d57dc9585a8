"""The step loop: run optimizer steps, check them, and hand each to the hooks (:mod:`jaxunlearn.training.hooks`).

The batch of step ``s`` is a function of ``(seed, s)`` only (:class:`~jaxunlearn.data.StepBatcher`), so a loop
started at any step sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax

from jaxunlearn.common import interrupts
from jaxunlearn.common.interrupts import Interrupted
from jaxunlearn.data import StepBatcher
from jaxunlearn.parallel import sharding
from jaxunlearn.training.hooks import Hook, Hooks, StepInfo


class NonFiniteError(RuntimeError):
    """The loss, gradient or updated parameters stopped being finite (gradient ascent is unbounded)."""


@dataclasses.dataclass
class LoopResult:
    state: Any
    steps: int  # steps done when the loop ended
    stopped: dict[str, Any] | None  # the stopping rule's record, when it ended the run
    last_metrics: dict[str, float]
    tokens_per_s: float | None  # excluding the first step (compilation)


class Trainer:
    """``step_fn(state, ref_params, batch) -> (state, metrics)`` over steps ``[start, total)``, with hooks."""

    def __init__(
        self,
        step_fn: Callable,
        batcher: StepBatcher,
        batch_shardings: Any,
        ref_params: Any,
        total: int,
        unlearned: Callable[[Any], Any] | None = None,
    ) -> None:
        """``unlearned``: the unlearned model as a function of the trained parameters, for the hooks
        (:attr:`StepInfo.params`); None when they are the same."""
        self.unlearned = unlearned
        self.step_fn = step_fn
        self.batcher = batcher
        self.batch_shardings = batch_shardings
        self.ref_params = ref_params
        self.total = total
        self.hooks = Hooks()

    def add_hook(self, fn: Hook, *, every: int = 1, at_end: bool = False, minutes: float = 0.0) -> None:
        """Call ``fn(info)`` after every ``every``-th step, when ``minutes`` have passed since it last ran, and on
        the step the loop ends with (``at_end``)."""
        self.hooks.add(fn, every=every, at_end=at_end, minutes=minutes)

    def step(self, state: Any, step: int) -> StepInfo:
        """Run optimizer step ``step`` (0-based); raises :class:`NonFiniteError` instead of applying a bad one."""
        host_batch = self.batcher.batch(step)
        tokens = sum(int(s["mask"].sum()) for s in host_batch.values())
        t0 = time.perf_counter()
        batch = sharding.host_to_global(host_batch, self.batch_shardings)
        state, metrics = self.step_fn(state, self.ref_params, batch)
        metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - t0
        if not metrics.pop("finite"):
            raise NonFiniteError(
                f"step {step + 1}: the loss ({metrics['loss']}), the gradient norm ({metrics['grad_norm']}) or the "
                "updated parameters are not finite; stopped without applying the step"
            )
        metrics["tokens_per_s"] = tokens / seconds
        return StepInfo(step + 1, self.total, state, metrics, tokens, seconds, unlearned=self.unlearned)

    def run(self, state: Any, start: int) -> LoopResult:
        """Steps from ``start`` until the last one, a stopping rule, or a signal (then :class:`Interrupted`, a
        ``KeyboardInterrupt``)."""
        info = None
        timed_tokens, timed_seconds = 0, 0.0
        for step in range(start, self.total):
            info = self.step(state, step)
            state = info.state
            if step > start:  # the first step includes compilation
                timed_tokens, timed_seconds = timed_tokens + info.tokens, timed_seconds + info.seconds
            self.hooks(info)
            if info.ending:
                break
        if info is not None and info.interrupted is not None:
            signum = info.interrupted
            raise Interrupted(
                signum, f"interrupted by {interrupts.name(signum)} after step {info.step}: rerun to resume"
            )
        return LoopResult(
            state,
            info.step if info else start,
            info.stopped if info else None,
            info.metrics if info else {},
            timed_tokens / timed_seconds if timed_seconds else None,
        )
