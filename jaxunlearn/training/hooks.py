"""Periodic work in the step loop, as hooks registered with a period (Levanter's ``trainer.add_hook(fn, every=n)``).

The loop (:mod:`jaxunlearn.training.loop`) only runs steps; everything else that happens "every N steps" is a hook:
metrics logging, progress, periodic perplexity, the stopping rule, signal handling, checkpointing. A hook is a
function of :class:`StepInfo`; it may end the run by setting ``info.stopped`` (finished: the stopping rule) or
``info.interrupted`` (resumable: a signal). Hooks run in registration order, so a hook that decides to stop
comes before the checkpoint hook that saves the final step. A new periodic action or stopping rule is one
function registered with ``trainer.add_hook(fn, every=n)``; the loop does not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxunlearn.common import interrupts

log = logging.getLogger("jaxunlearn")


@dataclasses.dataclass
class StepInfo:
    """One finished optimizer step, as hooks see it."""

    step: int  # optimizer steps done, this one included
    total: int
    state: Any  # the train state after this step
    metrics: dict[str, float]
    tokens: int  # non-padding tokens in the step's batch
    seconds: float  # wall time of the step
    stopped: dict[str, Any] | None = None  # set by a stopping rule: the run is finished after this step
    interrupted: int | None = None  # set on a signal: checkpoint this step, then exit (resumable)
    evaluations: dict[str, Any] = dataclasses.field(default_factory=dict)  # shared between hooks of this step
    # The unlearned model as a function of the trained parameters (task vectors); None: they are the same.
    unlearned: Callable[[Any], Any] | None = None
    _params: Any = dataclasses.field(default=None, repr=False)

    @property
    def params(self) -> Any:
        """The unlearned model's parameters after this step (what evaluations measure), computed once."""
        if self._params is None:
            params = self.state["params"]
            self._params = params if self.unlearned is None else self.unlearned(params)
        return self._params

    @property
    def finishing(self) -> bool:
        """The run ends with this step and is complete (last step, or the stopping rule met)."""
        return self.step == self.total or self.stopped is not None

    @property
    def ending(self) -> bool:
        """The loop ends after this step (finished or interrupted)."""
        return self.finishing or self.interrupted is not None


Hook = Callable[[StepInfo], None]


@dataclasses.dataclass
class _Registered:
    fn: Hook
    every: int  # run when step % every == 0 (0: never periodically)
    at_end: bool  # also run on the step the loop ends with
    seconds: float  # also run when this long has passed since it last ran (0: never by time)
    last: float  # the clock when it last ran (or was registered)


class Hooks:
    """Hooks with periods, run in registration order after every step. ``clock``: seconds (``time.monotonic``; a
    test's fake clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._hooks: list[_Registered] = []
        self._clock = clock

    def add(self, fn: Hook, *, every: int = 1, at_end: bool = False, minutes: float = 0.0) -> None:
        """Call ``fn(info)`` after every ``every``-th step, after the first step that ends ``minutes`` or more after
        it last ran (a period in time: checkpoints that bound the work a preemption loses), and on the last step
        with ``at_end``."""
        if every < 0 or minutes < 0:
            raise ValueError(f"every={every}, minutes={minutes}: must be >= 0")
        self._hooks.append(_Registered(fn, every, at_end, minutes * 60.0, self._clock()))

    def __call__(self, info: StepInfo) -> None:
        now = self._clock()  # one reading per step: hooks with the same period run on the same steps
        for hook in self._hooks:
            due = (hook.every and info.step % hook.every == 0) or (hook.at_end and info.ending)
            if due or (hook.seconds and now - hook.last >= hook.seconds):
                hook.last = now
                hook.fn(info)


# --- built-in hooks ---------------------------------------------------------------------------------------


def progress_line(start: int, log_to_console: bool) -> Hook:
    """A log line with the step, loss, throughput and ETA (in log.txt always; on stderr when there is no
    progress bar, e.g. in Slurm logs or over ``gcloud ... ssh``)."""
    t0 = time.perf_counter()

    def hook(info: StepInfo) -> None:
        done = info.step - start
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (info.total - info.step) if done else float("nan")
        log.info(
            "step %d/%d  loss %.5g  grad_norm %.3g  lr %.3g  %.0f tokens/s  ETA %s",
            info.step,
            info.total,
            info.metrics["loss"],
            info.metrics["grad_norm"],
            info.metrics["lr"],
            info.metrics["tokens_per_s"],
            _duration(eta),
            extra={"console": log_to_console},
        )

    return hook


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_bar(bar: Any) -> Hook:
    """Advance a tqdm bar and show the step's metrics on it."""

    def hook(info: StepInfo) -> None:
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in info.metrics.items() if k != "grad_norm"}, refresh=False)

    return hook


@contextlib.contextmanager
def signal_hook() -> Iterator[Hook]:
    """While active, SIGTERM/SIGINT (preemption, Ctrl-C) no longer stop the process at once
    (:func:`jaxunlearn.common.interrupts.deferred`): the hook marks the current step ``interrupted`` so that it is
    checkpointed and the run exits, resumable. A signal that comes after the last step's hooks is raised when the
    block ends (after the caller waited for the checkpoint)."""

    def hook(info: StepInfo) -> None:
        interrupts.fault_point(f"step{info.step}")  # tests: a signal during step N's hooks
        signum = interrupts.received() or 0
        if jax.process_count() > 1:
            # A signal reaches each host at its own moment: all processes must stop after the same step, or one
            # would wait forever in the next step's collectives for the others.
            from jax.experimental import multihost_utils

            signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
        if signum:
            info.interrupted = signum

    with interrupts.deferred("after the current step, which is checkpointed first"):
        yield hook


def checkpoint_hook(checkpointer: Any, meta: Callable[[StepInfo], dict[str, Any]]) -> Hook:
    """Save the train state and ``meta(info)`` (register with ``every=checkpoint.every_steps, at_end=True``)."""

    def hook(info: StepInfo) -> None:
        checkpointer.save(info.step, info.state, meta(info))

    return hook


# Fault injection for the resume tests: SIGKILL this process right after step N ("N": once the step's checkpoint,
# if any, is complete; "N!": at once, possibly in the middle of an asynchronous save).
KILL_AFTER_STEP_ENV = "JAXUNLEARN_FAULT_KILL_AFTER_STEP"


def kill_hook(spec: str, checkpointer: Any) -> Hook:
    """SIGKILL the process after the step ``spec`` names (see :data:`KILL_AFTER_STEP_ENV`)."""
    step, wait = int(spec.rstrip("!")), not spec.endswith("!")

    def hook(info: StepInfo) -> None:
        if info.step == step:
            if wait:
                checkpointer.wait()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
