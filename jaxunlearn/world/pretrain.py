"""Pre-training from scratch with jaxunlearn's own train step (plain next-token objective)."""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxunlearn.data import Chunks, StepBatcher
from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import Method, Needs
from jaxunlearn.models import ModelConfig, init_model, param_shardings, split_model
from jaxunlearn.parallel import sharding
from jaxunlearn.training.step import (
    batch_shardings,
    compile_train_step,
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)


def next_token_loss(params, ref_params, batch, rng, ctx: Context):
    """The language-modelling loss: mean NLL of the training chunks (per-sequence token mean)."""
    nll = jnp.mean(ctx.nll(params, batch["forget"]))
    return nll, {"nll": nll}


PRETRAIN = Method(
    "pretrain", next_token_loss, hparams={}, needs_rule=lambda hp: Needs(), summary="next-token pre-training"
)


def pretrain(
    config: ModelConfig,
    chunks: Chunks,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    mesh: Any = None,
    desc: str = "pre-training",
) -> tuple[Any, dict[str, float]]:
    """Train a freshly initialised model for ``steps`` steps of ``batch_size`` chunks; returns (model, stats).

    AdamW (0.9, 0.95), weight decay 0.1, 5% linear warmup then cosine to 0, clipping at 1.0. The chunk order is
    the seeded per-epoch shuffle of :class:`~jaxunlearn.data.StepBatcher`.
    """
    mesh = mesh or sharding.make_mesh()
    lm, params = split_model(init_model(config, seed=seed, mesh=mesh))
    optim = ml_collections.ConfigDict(
        dict(lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, warmup_ratio=0.05, schedule="cosine", clip_norm=1.0)
    )
    tx, schedule = make_optimizer(optim, steps)
    p_shardings = param_shardings(config, mesh)
    s_shardings = state_shardings(tx, p_shardings, mesh)
    state = init_state(params, tx, s_shardings)
    batcher = StepBatcher(chunks, None, batch_size, 1, seed)
    b_shardings = batch_shardings(batcher.batch(0), mesh)
    step_fn = compile_train_step(
        make_train_step(PRETRAIN, Context(lm, {}, seed=seed), tx, schedule), s_shardings, None, b_shardings, mesh
    )
    losses = []
    t0 = time.perf_counter()
    with sharding.activation_sharding(mesh), tqdm(total=steps, desc=desc, unit="step", disable=None) as bar:
        for step in range(steps):
            batch = sharding.host_to_global(batcher.batch(step), b_shardings)
            state, metrics = step_fn(state, None, batch)
            if step % 10 == 0 or step == steps - 1:
                losses.append(float(metrics["loss"]))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
    seconds = time.perf_counter() - t0
    tokens = int(steps * batch_size * chunks.tokens.shape[1])
    stats = {
        "steps": steps,
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-3:])),
    }
    return lm.bind(state["params"]), stats
