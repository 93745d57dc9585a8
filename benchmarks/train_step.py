"""Throughput of one unlearning step per method on a random Llama model (prints numbers; not a test).

    python benchmarks/train_step.py                       # ~5M params, seq 256, batch 8, CPU
    python benchmarks/train_step.py --size 1b --seq 2048 --batch 8 --dtype bfloat16 --peak-tflops 989

Reports forget tokens/s (the batch's forget chunks), processed tokens/s (forget + retain chunks), step time,
model FLOPs per step (6 x params x tokens + attention, plus 2 x params x tokens for every reference-model
forward) and, with --peak-tflops, the model-FLOPs utilisation. (XLA's cost analysis counts a scanned layer
loop's body once, so it is not used for FLOPs here.)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from sizes import SIZES

from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import get_method
from jaxunlearn.models import ModelConfig, init_model, param_shardings, split_model
from jaxunlearn.parallel import sharding
from jaxunlearn.training.flops import unlearning_step_flops
from jaxunlearn.training.step import (
    batch_shardings,
    compile_train_step,
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)

METHODS = ["ga", "random_label", "adversarial", "ga_gd", "ga_kl"]


def random_split(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    """One split of a step's batch as the data loader gives it: ``[1, batch, seq]`` random token ids (no special
    ids 0-2), full masks, chunk ids (one micro-batch, no gradient accumulation)."""
    return {
        "tokens": rng.integers(3, vocab, (1, batch, seq), dtype=np.int32),
        "mask": np.ones((1, batch, seq), np.int32),
        "chunk_id": np.arange(batch, dtype=np.int32)[None],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="5m")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="forget chunks per step (and as many retain chunks)")
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default="xla")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (H100 bf16 dense: 989)")
    p.add_argument("--fsdp", type=int, default=-1)
    p.add_argument("--tensor", type=int, default=1)
    args = p.parse_args()

    mesh = sharding.make_mesh(fsdp=args.fsdp, tensor=args.tensor)
    config = ModelConfig(
        **SIZES[args.size],
        dtype=args.dtype,
        remat=args.remat,
        attention_impl=args.attention,
        max_position_embeddings=max(args.seq, 4096),
    )
    lm, params = split_model(init_model(config, seed=0, mesh=mesh))
    p_sh = param_shardings(config, mesh)
    rng = np.random.default_rng(0)

    def split():
        return random_split(rng, args.batch, args.seq, config.vocab_size)

    optim = ml_collections.ConfigDict(
        dict(
            lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_ratio=0.0, schedule="constant", clip_norm=1.0
        )
    )
    print(
        f"model: {config.num_params / 1e6:.1f}M params, seq {args.seq}, batch {args.batch}, dtype {args.dtype}, "
        f"remat {args.remat}, mesh {dict(mesh.shape)} on {jax.devices()[0].device_kind}"
    )
    results = []
    for name in args.methods.split(","):
        method = get_method(name)
        needs = method.needs()
        tx, schedule = make_optimizer(optim, 100)
        s_sh = state_shardings(tx, p_sh, mesh)
        state = init_state(jax.tree.map(jnp.copy, params), tx, s_sh)
        ref = jax.tree.map(jnp.copy, params) if needs.reference else None
        batch = {"forget": split(), "retain": split()} if needs.retain else {"forget": split()}
        b_sh = batch_shardings(batch, mesh)
        batch = jax.device_put(batch, b_sh)
        ctx = Context(lm, hparams=method.hparams, extras={"label_ids": np.arange(3, config.vocab_size, dtype=np.int32)})
        step = compile_train_step(make_train_step(method, ctx, tx, schedule), s_sh, p_sh if ref else None, b_sh, mesh)
        with sharding.activation_sharding(mesh):
            compiled = step.lower(state, ref, batch).compile()
            state, m = compiled(state, ref, batch)
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = compiled(state, ref, batch)
            jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / args.steps
        forget_tokens = args.batch * args.seq
        processed = forget_tokens * (2 if needs.retain else 1)
        flops = unlearning_step_flops(
            config, args.seq, args.batch, retain=needs.retain, reference_forwards=needs.reference_forwards
        )
        row = {
            "method": name,
            "step_s": round(dt, 4),
            "forget_tokens_per_s": round(forget_tokens / dt, 1),
            "processed_tokens_per_s": round(processed / dt, 1),
            "model_tflops_per_step": round(flops / 1e12, 4),
        }
        if args.peak_tflops:
            row["mfu"] = round(flops / dt / (args.peak_tflops * 1e12 * mesh.devices.size), 4)
        results.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
