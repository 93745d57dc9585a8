"""Throughput of the evaluation loop and of KV-cached greedy generation on a random Llama (prints numbers).

python benchmarks/evaluation.py                 # ~5M params, 64 chunks of 256 tokens, CPU
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sizes import SIZES

from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.models import ModelConfig, init_model, split_model
from jaxunlearn.models.generation import generate
from jaxunlearn.parallel import sharding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="5m")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    mesh = sharding.make_mesh()
    config = ModelConfig(**SIZES[args.size], dtype=args.dtype, max_position_embeddings=max(args.seq, 4096))
    lm, params = split_model(init_model(config, mesh=mesh))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (args.chunks, args.seq), dtype=np.int32)
    mask = np.ones_like(tokens)
    ev = Evaluator(lm, mesh, batch_size=args.batch)
    ev.token_stats(params, tokens[: args.batch], mask[: args.batch])  # compile
    t0 = time.perf_counter()
    ev.token_stats(params, tokens, mask)
    dt = time.perf_counter() - t0
    print(f"model: {config.num_params / 1e6:.1f}M params, dtype {args.dtype}, mesh {dict(mesh.shape)}")
    print(
        json.dumps(
            {
                "what": "teacher-forced stats",
                "chunks": args.chunks,
                "seq": args.seq,
                "tokens_per_s": round(args.chunks * args.seq / dt, 1),
            }
        )
    )
    prompts = tokens[: args.batch * 2, : args.prompt]
    generate(lm, params, prompts[: args.batch], max_new_tokens=args.new_tokens, mesh=mesh, batch_size=args.batch)
    t0 = time.perf_counter()
    generate(lm, params, prompts, max_new_tokens=args.new_tokens, mesh=mesh, batch_size=args.batch)
    dt = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "what": "greedy generation (KV cache)",
                "sequences": len(prompts),
                "prompt": args.prompt,
                "new_tokens": args.new_tokens,
                "generated_tokens_per_s": round(len(prompts) * args.new_tokens / dt, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
