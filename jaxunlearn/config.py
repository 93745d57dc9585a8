"""The one base configuration every ``configs/*.py`` file is composed from, and its validation.

Config files are ml-collections ``get_config()`` files; any field can be overridden on the command line
(``--config.optim.lr=1e-5``). :func:`validate` runs before any work and names the offending key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from jaxunlearn.objectives import METHODS, get_method
from jaxunlearn.sharding import DEFAULT_RULES, MeshError, normalize_rules
from jaxunlearn.world.build import WorldRecipe

# The paper's data set on the Hugging Face Hub (configs arxiv / github / general).
PAPER_DATASET = "llmunlearn/unlearn_dataset"
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the key."""


def split_config(path: str = "", name: str = "", split: str = "", column: str = "", max_documents: int = 0):
    """One data split: a local file/directory or a Hub dataset (``path``, ``name``, ``split``)."""
    return ml_collections.ConfigDict(
        dict(path=path, name=name, split=split, column=column, max_documents=max_documents)
    )


def method_config(name: str) -> ml_collections.ConfigDict:
    """``{"name": name, **default hyper-parameters of that method}``."""
    return ml_collections.ConfigDict(dict(name=name, **get_method(name).hparams))


PRESETS = ("builtin", "arxiv", "github")


def base_config(method: str = "ga", *, preset: str = "builtin", retain: str = "in_distribution"):
    """The shared base for ``method``.

    ``preset``: ``builtin`` (default) runs on the built-in world, a small model pre-trained on this machine with
    its exact-retrain oracle (:mod:`jaxunlearn.world`); ``arxiv``/``github`` are the paper's recipe on its data
    set (give the model with ``--config.model.path``; Yi-6B in the paper). Config files pass the preset through:
    ``--config=configs/ga_kl.py:arxiv``. ``retain`` picks the retain set of methods with a retain term: the
    domain's own retain split (``in_distribution``) or the general corpus (``general``).
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if retain not in ("in_distribution", "general"):
        raise ConfigError(f"retain={retain!r}: choose in_distribution or general")
    domain = preset if preset != "builtin" else "arxiv"
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = ml_collections.ConfigDict(
        dict(
            path="",  # local Hugging Face directory or Hub id (Yi-6B in the paper: "01-ai/Yi-6B")
            tokenizer="",  # default: the model's own
            revision="",
            param_dtype="float32",  # master weights and AdamW state
            dtype="bfloat16",  # compute
            reference_dtype="",  # frozen original model for KL/adversarial; default: param_dtype
            remat="none",
            attention_impl="xla",
        )
    )
    # Logical axis -> mesh axes (see jaxunlearn/sharding.py); the layers only ever name logical axes.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, rules=DEFAULT_RULES))
    retain_split = split_config(PAPER_DATASET, domain, "retain")
    if retain == "general":
        retain_split = split_config(PAPER_DATASET, "general", "retain")
    c.data = ml_collections.ConfigDict(
        dict(
            max_length=4096,
            min_chunk_tokens=5,
            add_special_tokens=True,
            cache_dir="",  # default: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn
            forget=split_config(PAPER_DATASET, domain, "forget"),
            retain=retain_split,
            # Evaluation only: unseen same-domain documents (the MIA non-members and the "approximate
            # retraining" reference) and general held-out text. An empty path skips a split.
            approximate=split_config(PAPER_DATASET, domain, "approximate"),
            general=split_config(PAPER_DATASET, "general", "evaluation"),
            # Retain-set utility is measured on this split when given, else on `retain`.
            eval_retain=split_config(),
        )
    )
    c.method = method_config(method)
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=2e-5,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            warmup_ratio=0.03,
            schedule="cosine",
            clip_norm=1.0,  # 0 disables clipping
        )
    )
    # Effective batch = micro_batch_size x grad_accum_steps chunks per optimizer step (paper, arXiv: 8 GPUs x 1
    # x 60 = 480 chunks of 4096 tokens; GitHub: 8 x 85 = 680).
    c.train = ml_collections.ConfigDict(
        dict(
            micro_batch_size=8,  # global, split over the data x fsdp mesh axes
            grad_accum_steps=60,
            epochs=1,
            max_steps=0,  # > 0 overrides epochs
            logits_chunk_size=1024,  # positions per vocabulary-projection chunk in the losses
            log_every=1,
        )
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=10, keep=2, export=True, export_dtype=""))
    c.evaluation = ml_collections.ConfigDict(
        dict(
            enabled=True,  # evaluate before and after unlearning and write report.json / report.md
            every_steps=0,  # also measure perplexities every N steps (0 = never during the run)
            batch_size=8,
            max_chunks=0,  # chunks per split (0 = all)
            in_run_max_chunks=64,  # chunks per split for the evaluations during the run
            mia_ks=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0),
            reference_model="",  # a model for the reference-ratio attack (HF dir or Hub id)
            retrained_auc=0.0,  # Min-K% (k=0.4) AUC of a retrained model, for MUSE's PrivLeak (0 = unknown)
            oracle_model="",  # a model retrained without the forget set: an "oracle" column and distances to it
            verbatim_prompt_tokens=32,
            verbatim_new_tokens=64,
            verbatim_max_chunks=100,
            tasks=("",),  # multiple-choice task specs FORMAT:PATH[:CONFIG[:SPLIT]]; see evaluation/tasks.py
            task_max_items=0,
            # Stop unlearning once forget perplexity reaches a target, checked every `stop_every_steps` steps
            # (0 = at every `every_steps` evaluation) on the forget split alone (and the approximate one with
            # stop_approx_reference="current"), which is cheaper than a full evaluation:
            stop_every_steps=0,
            stop_forget_ppl=0.0,  # an absolute target
            stop_approx_multiple=0.0,  # or this multiple of the approximate split's perplexity, measured
            stop_approx_reference="start",  # at the start of unlearning, or at each check ("current")
            pretraining_tokens=3.0e12,  # for the compute ratio (Yi-6B: 3T tokens)
        )
    )
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods / multi-node GPU)
    # The built-in world, used wherever a path reads "world:<target|oracle|forget|retain|...>".
    c.world = ml_collections.ConfigDict(dict(cache_dir="", **dataclasses.asdict(WorldRecipe())))
    if preset == "builtin":
        _use_builtin_world(c, method, retain)
    return c


# Learning rates for the built-in world, from the sweep of `python -m jaxunlearn.experiments.compare`.
BUILTIN_LR = {"ga": 3e-5, "random_label": 3e-5, "adversarial": 3e-5, "ga_gd": 1e-3, "ga_kl": 3e-4}
# Ascent weight of the GA+GD / GA+KL forget term in the built-in world (the paper's 1.0 overshoots at once).
BUILTIN_FORGET_WEIGHT = 0.15


def _use_builtin_world(c: ml_collections.ConfigDict, method: str, retain: str) -> None:
    """Point every path at the built-in world and size the run for a 2-core CPU."""
    c.model.path = "world:target"
    c.model.dtype = "float32"  # small models on CPUs run faster in fp32
    d = c.data
    d.max_length = c.world.max_length
    d.add_special_tokens = False
    d.forget = split_config("world:forget")
    # In-distribution retain data of the built-in world = every pre-training document but the forget set (the
    # oracle's training data); "general" = the general-domain part only.
    d.retain = split_config("world:general_retain" if retain == "general" else "world:retain+general_retain")
    d.approximate = split_config("world:approximate")
    d.general = split_config("world:general_eval")
    d.eval_retain = split_config("world:retain")
    c.optim.lr = BUILTIN_LR.get(method, 1e-4)
    if "forget_weight" in c.method:
        c.method.forget_weight = BUILTIN_FORGET_WEIGHT
    c.train.micro_batch_size = 8
    c.train.grad_accum_steps = 1
    c.train.epochs = 4
    c.checkpoint.every_steps = 25
    e = c.evaluation
    e.oracle_model = "world:oracle"
    e.batch_size = 32
    e.max_chunks = 512
    e.every_steps = 10  # perplexity history of every split
    e.stop_every_steps = 2  # the stopping rule, on the forget split
    e.in_run_max_chunks = 32
    e.stop_approx_multiple = 1.0  # stop when forget text looks as unseen as unseen text
    e.verbatim_max_chunks = 64
    e.pretraining_tokens = float(c.world.steps * c.world.batch_size * c.world.max_length)


# --- validation -------------------------------------------------------------------------------------------


def _flat(cfg: Any, prefix: str = "config") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {requirement}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` naming the first unknown key or bad value."""
    if "method" not in config or "name" not in config.method:
        raise ConfigError("config.method.name is missing")
    name = config.method.name
    _check(name in METHODS, "config.method.name", name, f"unknown method; known: {', '.join(sorted(METHODS))}")
    method = get_method(name)
    reference = _flat(base_config(name))
    given = _flat(config)
    for key in sorted(set(given) - set(reference)):
        raise ConfigError(f"{key}: unknown config key")
    for key in sorted(set(reference) - set(given)):
        raise ConfigError(f"{key}: missing config key")
    for key, value in given.items():
        expected = type(reference[key])
        ok = isinstance(value, expected) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool)
        )
        _check(ok, key, value, f"must be a {expected.__name__}")

    m, d, o, t, k = config.model, config.data, config.optim, config.train, config.checkpoint
    _check(bool(m.path), "config.model.path", m.path, "give a local Hugging Face directory or a Hub id")
    for key in ("param_dtype", "dtype"):
        _check(m[key] in DTYPES, f"config.model.{key}", m[key], f"one of {DTYPES}")
    _check(
        m.reference_dtype in DTYPES + ("",), "config.model.reference_dtype", m.reference_dtype, f"one of {DTYPES} or ''"
    )
    try:
        normalize_rules(config.mesh.rules)
    except (MeshError, TypeError, ValueError) as e:
        raise ConfigError(f"config.mesh.rules: {e}") from e
    for key in ("data", "fsdp", "tensor"):
        v = config.mesh[key]
        _check(v >= 1 or v == -1, f"config.mesh.{key}", v, "positive, or -1 for the remaining devices")
    _check(d.max_length >= 2, "config.data.max_length", d.max_length, "at least 2")
    _check(
        1 <= d.min_chunk_tokens <= d.max_length,
        "config.data.min_chunk_tokens",
        d.min_chunk_tokens,
        "in [1, max_length]",
    )
    _check(bool(d.forget.path), "config.data.forget.path", d.forget.path, "the forget set is required")
    if method.needs_retain:
        _check(bool(d.retain.path), "config.data.retain.path", d.retain.path, f"method {name} needs a retain set")
    for split in ("forget", "retain", "approximate", "general", "eval_retain"):
        v = d[split].max_documents
        _check(v >= 0, f"config.data.{split}.max_documents", v, ">= 0 (0 = all)")
    _check(o.lr > 0, "config.optim.lr", o.lr, "must be > 0")
    for key in ("b1", "b2"):
        _check(0 <= o[key] < 1, f"config.optim.{key}", o[key], "in [0, 1)")
    _check(o.eps > 0, "config.optim.eps", o.eps, "must be > 0")
    _check(o.weight_decay >= 0, "config.optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 <= o.warmup_ratio < 1, "config.optim.warmup_ratio", o.warmup_ratio, "in [0, 1)")
    _check(o.schedule in SCHEDULES, "config.optim.schedule", o.schedule, f"one of {SCHEDULES}")
    _check(o.clip_norm >= 0, "config.optim.clip_norm", o.clip_norm, ">= 0 (0 disables clipping)")
    _check(t.micro_batch_size >= 1, "config.train.micro_batch_size", t.micro_batch_size, ">= 1")
    _check(t.grad_accum_steps >= 1, "config.train.grad_accum_steps", t.grad_accum_steps, ">= 1")
    _check(t.epochs >= 1, "config.train.epochs", t.epochs, ">= 1")
    _check(t.max_steps >= 0, "config.train.max_steps", t.max_steps, ">= 0 (0 = use epochs)")
    _check(t.logits_chunk_size >= 1, "config.train.logits_chunk_size", t.logits_chunk_size, ">= 1")
    _check(t.log_every >= 1, "config.train.log_every", t.log_every, ">= 1")
    _check(k.every_steps >= 0, "config.checkpoint.every_steps", k.every_steps, ">= 0 (0 = only at the end)")
    _check(k.keep >= 1, "config.checkpoint.keep", k.keep, ">= 1")
    _check(k.export_dtype in DTYPES + ("",), "config.checkpoint.export_dtype", k.export_dtype, f"one of {DTYPES} or ''")
    e = config.evaluation
    for key in ("batch_size", "in_run_max_chunks", "verbatim_prompt_tokens"):
        _check(e[key] >= 1, f"config.evaluation.{key}", e[key], ">= 1")
    for key in ("every_steps", "max_chunks", "verbatim_new_tokens", "verbatim_max_chunks", "task_max_items"):
        _check(e[key] >= 0, f"config.evaluation.{key}", e[key], ">= 0")
    _check(all(0 < k <= 1 for k in e.mia_ks), "config.evaluation.mia_ks", e.mia_ks, "fractions in (0, 1]")
    _check(0 <= e.retrained_auc <= 1, "config.evaluation.retrained_auc", e.retrained_auc, "in [0, 1] (0 = unknown)")
    _check(e.stop_forget_ppl >= 0, "config.evaluation.stop_forget_ppl", e.stop_forget_ppl, ">= 0 (0 = off)")
    _check(e.stop_approx_multiple >= 0, "config.evaluation.stop_approx_multiple", e.stop_approx_multiple, ">= 0")
    _check(
        e.stop_approx_reference in ("start", "current"),
        "config.evaluation.stop_approx_reference",
        e.stop_approx_reference,
        "start or current",
    )
    _check(e.stop_every_steps >= 0, "config.evaluation.stop_every_steps", e.stop_every_steps, ">= 0")
    if e.enabled and (e.stop_forget_ppl or e.stop_approx_multiple):
        _check(
            e.every_steps > 0 or e.stop_every_steps > 0,
            "config.evaluation.every_steps",
            e.every_steps,
            "the stopping rule needs every_steps or stop_every_steps > 0",
        )
    if e.enabled and e.stop_approx_multiple:
        _check(
            bool(d.approximate.path),
            "config.data.approximate.path",
            d.approximate.path,
            "stop_approx_multiple needs the approximate split",
        )
    _check(e.pretraining_tokens >= 0, "config.evaluation.pretraining_tokens", e.pretraining_tokens, ">= 0")
    w = config.world
    for key in (
        "forget_docs",
        "approximate_docs",
        "band_min_chars",
        "retain_chars",
        "vocab_size",
        "max_length",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "steps",
        "batch_size",
        "forget_repeats",
    ):
        _check(w[key] >= 1, f"config.world.{key}", w[key], ">= 1")
    _check(w.band_max_chars >= w.band_min_chars, "config.world.band_max_chars", w.band_max_chars, ">= band_min_chars")
    _check(0 < w.general_eval_fraction < 1, "config.world.general_eval_fraction", w.general_eval_fraction, "in (0, 1)")
    _check(w.lr > 0, "config.world.lr", w.lr, "must be > 0")
    _check(w.hidden_size % w.num_heads == 0, "config.world.num_heads", w.num_heads, "must divide hidden_size")
    for hp, value in config.method.items():
        if hp != "name" and isinstance(value, (int, float)):
            _check(value >= 0, f"config.method.{hp}", value, "must be >= 0")
