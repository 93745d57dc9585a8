"""The stamp every result file carries: config, seed, mesh, dtypes, library versions, host."""

from __future__ import annotations

import datetime
import socket
from typing import Any

import jax

from jaxunlearn.common.versions import library_versions
from jaxunlearn.data import DocumentSource
from jaxunlearn.parallel.sharding import describe_mesh
from jaxunlearn.run.prepare import Prepared, split_names
from jaxunlearn.training import flops


def environment(mesh: Any = None) -> dict[str, Any]:

    devices = jax.devices()
    env = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "versions": library_versions(),
    }
    if mesh is not None:
        env["mesh"] = describe_mesh(mesh)
    return env


def run_record(prep: Prepared) -> dict[str, Any]:
    """The start of ``run.json``: the resolved config, seed, model, dtypes, data sizes, mesh and versions."""
    config, model_config, batcher = prep.config, prep.model_config, prep.batcher
    return {
        "config": config.to_dict(),
        "method": config.method.name,
        "needs": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in vars(prep.needs).items()},
        "seed": config.seed,
        "model": {
            "path": config.model.path,
            "source": prep.source_config.model.path if prep.source_config else config.model.path,
            "model_type": model_config.model_type,
            "num_params": model_config.num_params,
        },
        "world": (
            {"directory": str(prep.world.directory), "recipe": prep.world.manifest["recipe"]} if prep.world else None
        ),
        "dtypes": {
            "param": model_config.param_dtype,
            "compute": model_config.dtype,
            "reference": config.model.reference_dtype or model_config.param_dtype,
            "evaluation": config.evaluation.dtype or model_config.dtype,
        },
        "data": {
            "sources": data_sources(prep),
            "forget_chunks": len(batcher.forget),
            "forget_tokens": batcher.forget.num_tokens,
            "retain_chunks": len(batcher.retain) if batcher.retain is not None else 0,
            "chunks_per_step": batcher.chunks_per_step,
            "steps_per_epoch": batcher.steps_per_epoch,
            "eval_chunks": {k: len(v) for k, v in prep.eval_splits.items()},
        },
        "total_steps": prep.total_steps,
        "environment": environment(prep.mesh),
    }


def data_sources(prep: Prepared) -> dict[str, str]:
    """Where each split read by the run comes from, as given in the config (``world:`` references kept)."""

    config = prep.source_config or prep.config
    names = split_names(prep.config, prep.needs, training=prep.batcher is not None)
    out = {}
    for split in names:
        section = config.data[split]
        builtin = section.path.startswith("world:")
        out[split] = (
            f"{section.path} (built-in world)" if builtin else DocumentSource.from_config(split, section).describe()
        )
    return out


def stamp(record: dict[str, Any], steps: int, stopped: Any) -> dict[str, Any]:
    """The report's header: what ran, on which model and data, with which optimizer, where, and how it ended."""
    env, config = record["environment"], record["config"]
    o, t = config["optim"], config["train"]
    return {
        "title": f"{record['method']} on {record['model']['source']}",
        "model": record["model"],
        "method": record["method"],
        "hparams": {k: v for k, v in config["method"].items() if k != "name"},
        "optimizer": (
            f"AdamW, lr {o['lr']:g} ({o['schedule']}, warmup {o['warmup_ratio']:g}), clip {o['clip_norm']:g}, "
            f"weight decay {o['weight_decay']:g}; {t['micro_batch_size']} x {t['grad_accum_steps']} forget chunks "
            "per step"
        ),
        "data": record["data"]["sources"],
        "seed": record["seed"],
        "mesh": env.get("mesh", {}).get("shape"),
        "dtypes": record["dtypes"],
        "steps": steps,
        "stopped": stopped,
        "versions": env["versions"],
        "device": f"{env['device_count']} x {env['device_kind']}",
    }


def compute_summary(prep: Prepared, steps: int) -> dict[str, Any]:
    """Unlearning FLOPs against pre-training the model from scratch (the paper's efficiency claim)."""

    config, needs = prep.config, prep.needs
    step = flops.unlearning_step_flops(
        prep.model_config,
        config.data.max_length,
        prep.batcher.chunks_per_step,
        retain=needs.retain,
        reference_forwards=needs.reference_forwards,
    )
    unlearning = step * steps
    pretrain_tokens = float(config.evaluation.pretraining_tokens)
    pretraining = flops.pretraining_flops(prep.model_config, pretrain_tokens, config.data.max_length)
    return {
        "model_params": prep.model_config.num_params,
        "unlearning_steps": steps,
        "unlearning_flops": unlearning,
        "pretraining_tokens": pretrain_tokens,
        "pretraining_flops": pretraining,
        "retraining_over_unlearning": pretraining / unlearning if unlearning else None,
        "note": "model FLOPs (6N per trained token + attention, 2N per reference-model token); evaluation excluded",
    }
