"""The relearning attack (Hu et al. 2024, arXiv 2406.13356; Deeb & Roger 2024, arXiv 2410.08827): fine-tune a copy
of a model for a few steps on text close to the forget set, and measure whether what was forgotten comes back.

Unlearning that only hides knowledge is undone by a little fine-tuning on related text; an exact retrain learns the
same text for the first time. So the attack is run on every model of a run (original, unlearned, oracle) with the
same data, steps and seed, and the oracle's curve is the baseline. The fine-tuning is plain next-token descent
(AdamW, constant learning rate, clipping at 1.0) with the run's own jitted, sharded train step, on a copy: the
evaluated parameters are never touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxunlearn.data import Chunks, StepBatcher
from jaxunlearn.methods.context import Context
from jaxunlearn.models import LanguageModel, param_shardings
from jaxunlearn.parallel import sharding
from jaxunlearn.training.step import batch_shardings, compile_train_step, init_state, make_optimizer, make_train_step
from jaxunlearn.training.step import state_shardings as train_state_shardings
from jaxunlearn.world.pretrain import PRETRAIN


def split_by_document(chunks: Chunks, fraction: float, seed: int) -> tuple[Chunks, Chunks]:
    """``(relearn, measured)``: the chunks of a seeded ``fraction`` of the documents (at least one), and those of
    the others (at least one). Whole documents go to one side, so the measured text was never relearned."""
    docs = np.unique(chunks.doc_index)
    if len(docs) < 2:
        raise ValueError(f"the forget split has {len(docs)} document(s): holding some out for relearning needs two")
    n = min(max(1, round(fraction * len(docs))), len(docs) - 1)
    chosen = np.random.default_rng([seed, 0x4E1]).permutation(docs)[:n]
    relearn = np.isin(chunks.doc_index, chosen)
    return chunks.take(np.flatnonzero(relearn)), chunks.take(np.flatnonzero(~relearn))


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int
    lr: float
    batch_size: int
    every: int  # measure every this many steps (and after the last)
    seed: int


class Relearner:
    """Fine-tunes copies of one model structure's parameters on one mesh; the compiled step is built once."""

    def __init__(self, lm: LanguageModel, mesh: Any, rules: Any, settings: Settings, chunk_size: int):

        self.lm, self.mesh, self.rules, self.settings = lm, mesh, sharding.normalize_rules(rules), settings
        ways = sharding.batch_ways(mesh, self.rules)
        self.batch_size = -(-settings.batch_size // ways) * ways  # a multiple of the batch-parallel mesh size
        optim = ml_collections.ConfigDict(
            dict(lr=settings.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_ratio=0.0, schedule="constant")
        )
        optim.clip_norm = 1.0
        self.tx, schedule = make_optimizer(optim, settings.steps)
        self.param_shardings = param_shardings(lm.config, mesh, self.rules)
        self.state_shardings = train_state_shardings(self.tx, self.param_shardings, mesh)
        self._step = make_train_step(
            PRETRAIN, Context(lm, {}, seed=settings.seed, chunk_size=chunk_size), self.tx, schedule
        )
        self._compiled: dict[Any, Callable] = {}
        self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_shardings)

    def _compiled_step(self, batch: Any) -> tuple[Callable, Any]:
        key = tuple(x.shape for x in jax.tree.leaves(batch))
        if key not in self._compiled:
            b_shardings = batch_shardings(batch, self.mesh, self.rules)
            step = compile_train_step(self._step, self.state_shardings, None, b_shardings, self.mesh, self.rules)
            self._compiled[key] = (step, b_shardings)
        return self._compiled[key]

    def run(self, params: dict, chunks: Chunks, measure: Callable[[int, dict], None]) -> None:
        """``measure(0, params)``, then fine-tune a copy of ``params`` on ``chunks`` (a seeded shuffle, cycled) for
        ``steps`` steps, calling ``measure(step, relearned_params)`` every ``every`` steps and after the last."""
        s = self.settings
        if len(chunks) < self.batch_size:
            raise ValueError(
                f"relearning takes {self.batch_size} chunks per step but its text has only {len(chunks)}: lower "
                "config.evaluation.relearning.batch_size"
            )
        measure(0, params)
        state = init_state(self._copy(params), self.tx, self.state_shardings)  # the step donates its state
        batcher = StepBatcher(chunks, None, self.batch_size, 1, s.seed)
        for step in range(s.steps):
            host = batcher.batch(step)
            step_fn, b_shardings = self._compiled_step(host)
            state, _ = step_fn(state, None, sharding.host_to_global(host, b_shardings))
            if (step + 1) % s.every == 0 or step + 1 == s.steps:
                measure(step + 1, state["params"])


def steps_to_reach(curve: list[dict[str, Any]], level: float, key: str = "forget_ppl") -> int | None:
    """The first measured step whose ``key`` is at or below ``level`` (None: not within the attack's steps)."""
    for point in curve:
        if point[key] <= level:
            return int(point["step"])
    return None
