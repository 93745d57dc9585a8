"""Hooks that evaluate during unlearning: the perplexity history and the stopping rule."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections

from jaxunlearn.evaluation.runner import RunEvaluations
from jaxunlearn.training.hooks import Hook, StepInfo

log = logging.getLogger("jaxunlearn")


def perplexity_hook(evals: RunEvaluations, writer: Any) -> Hook:
    """Every split's perplexity into the history (register with ``every=evaluation.every_steps``).

    Not on the last step: the final evaluation measures it anyway."""

    def hook(info: StepInfo) -> None:
        if info.step >= info.total:
            return
        entry = evals.in_run(info.params, info.step)
        writer.write(info.step, {f"{k}_ppl": v["ppl"] for k, v in entry["perplexity"].items()}, prefix="eval")
        info.evaluations["perplexity"] = entry

    return hook


@dataclasses.dataclass
class StoppingRule:
    """Stop unlearning once forget perplexity reaches a target: an absolute one (``stop_forget_ppl``), or a
    multiple of the approximate split's perplexity at the start (``stop_approx_multiple``, the paper's
    "approximate retraining" criterion) or at each check (``stop_approx_reference="current"``)."""

    target: float | None  # None with stop_approx_reference="current" until the first check
    multiple: float  # > 0: the target follows the approximate split's current perplexity
    every: int
    chunks: int  # forget chunks measured at each check (evaluation.in_run_max_chunks)

    @classmethod
    def from_config(cls, ev: ml_collections.ConfigDict, initial: dict[str, Any]) -> StoppingRule | None:
        """The rule of ``config.evaluation`` (None when off); ``initial`` is the history entry of step 0."""
        if not ev.enabled or not (ev.stop_forget_ppl or ev.stop_approx_multiple):
            return None
        current = ev.stop_approx_multiple if not ev.stop_forget_ppl and ev.stop_approx_reference == "current" else 0
        target = ev.stop_forget_ppl or ev.stop_approx_multiple * initial["perplexity"]["approximate"]["ppl"]
        return cls(target, current, ev.stop_every_steps or ev.every_steps, ev.in_run_max_chunks)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("forget", "approximate") if self.multiple else ("forget",)

    def hook(self, evals: RunEvaluations, writer: Any) -> Hook:
        """Check the rule every ``self.every`` steps and whenever a full evaluation ran (register with every=1)."""

        def hook(info: StepInfo) -> None:
            entry = info.evaluations.get("perplexity")
            if info.step >= info.total or (info.step % self.every and entry is None):
                return
            if entry is None:  # the forget split alone (and approximate for "current"): cheaper than all
                entry = evals.in_run(info.params, info.step, only=self.splits)
                writer.write(info.step, {f"{k}_ppl": v["ppl"] for k, v in entry["perplexity"].items()}, prefix="eval")
            self.check(info, entry)

        return hook

    def check(self, info: StepInfo, entry: dict[str, Any]) -> None:
        if self.multiple:
            self.target = self.multiple * entry["perplexity"]["approximate"]["ppl"]
        forget = entry["perplexity"]["forget"]
        if forget["ppl"] < self.target:
            return
        info.stopped = {
            "step": info.step,
            "forget_ppl": forget["ppl"],
            "target": self.target,
            "chunks": forget["chunks"],
        }
        log.info(
            "stopping rule met at step %d: forget perplexity %.4g >= %.4g (measured on %d evenly spaced forget "
            "chunks, evaluation.in_run_max_chunks; the report's tables use up to evaluation.max_chunks)",
            info.step,
            forget["ppl"],
            self.target,
            forget["chunks"],
        )
