"""The one base configuration every ``configs/*.py`` file is composed from, and its validation.

Config files are ml-collections ``get_config()`` files; any field can be overridden on the command line
(``--config.optim.lr=1e-5``). :func:`validate` runs before any work and names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from jaxunlearn import presets
from jaxunlearn.data.qa import check_template
from jaxunlearn.evaluation.registry import registered
from jaxunlearn.objectives import METHODS, get_method, method_hparams, resolve_needs
from jaxunlearn.sharding import DEFAULT_RULES, MeshError, normalize_rules
from jaxunlearn.world.build import WorldRecipe

# The paper's data set on the Hugging Face Hub (configs arxiv / github / general).
PAPER_DATASET = "llmunlearn/unlearn_dataset"
# The paper's third domain, books, was never released (only arXiv, GitHub and general text are on the Hub). The
# `books` preset stands in PG-19 (DeepMind's Project Gutenberg books published before 1919; TensorFlow Datasets
# `pg19`, text feature `book_text`; train 28,602 / validation 50 / test 100 books), prepared in a TFDS data_dir.
# TFDS stores a split in a fixed order by a hash of each book's id, the same on every machine, so the first books of
# `train` are a fixed pseudo-random sample of it: forget = the first 50 (about 20 MB of text at PG-19's mean of
# ~0.4 MB a book, the size of the paper's arXiv forget set, 22 MB), in-distribution retain = the next 100 (disjoint
# from forget), approximate = the 100 `test` books (never trained on by the unlearning, same era and source).
BOOKS_COLUMN = "book_text"
BOOKS_SPLITS = {
    "forget": "tfds:pg19:train[:50]",
    "retain": "tfds:pg19:train[50:150]",
    "approximate": "tfds:pg19:test",
}
DTYPES = ("float32", "bfloat16", "float16")
DATA_SPLITS = ("forget", "retain", "approximate", "general", "eval_retain")
WORLD_POSITIVE = (
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
)
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the key."""


def split_config(
    path: str = "",
    name: str = "",
    split: str = "",
    column: str = "",
    max_documents: int = 0,
    tfds_data_dir: str = "",
    question: str = "",
):
    """One data split: a local file/directory, a Hub dataset (``path``, ``name``, ``split``) or a TensorFlow Datasets
    selection (``path="tfds:NAME[/CONFIG][:VERSION]:SPLIT"``, read from ``tfds_data_dir``, default TFDS's own).
    ``question``: question-answer data, the question column (``column`` is the answer's, default ``answer``): one
    chunk per record, laid out by ``data.qa_template``, whose loss counts the answer only."""
    return ml_collections.ConfigDict(
        dict(
            path=path,
            name=name,
            split=split,
            column=column,
            max_documents=max_documents,
            tfds_data_dir=tfds_data_dir,
            question=question,
        )
    )


def method_config(name: str) -> ml_collections.ConfigDict:
    """``{"name": name, **default hyper-parameters of that method}``."""
    return ml_collections.ConfigDict(dict(name=name, **get_method(name).hparams))


PAPER_PRESETS = ("builtin", "arxiv", "github", "books")
PRESETS = PAPER_PRESETS + presets.names()  # and the benchmarks': tofu[_forget01|05|10], ...


def base_config(method: str = "ga", *, preset: str = "builtin", retain: str = "in_distribution"):
    """The shared base for ``method``.

    ``preset``: ``builtin`` (default) runs on the built-in world, a small model pre-trained on this machine with
    its exact-retrain oracle (:mod:`jaxunlearn.world`); ``arxiv``/``github`` are the paper's recipe on its data
    set (give the model with ``--config.model.path``; Yi-6B in the paper), and ``books`` the same recipe on PG-19
    books from a TFDS data_dir (see ``BOOKS_SPLITS``); the benchmarks' presets (``tofu``, ...) are in
    :mod:`jaxunlearn.presets`. Config files pass the preset through:
    ``--config=configs/ga_kl.py:arxiv``. ``retain`` picks the retain set of methods with a retain term: the
    domain's own retain split (``in_distribution``) or the general corpus (``general``).
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r}: choose one of {', '.join(PRESETS)} (e.g. --config=configs/ga.py:arxiv)")
    if retain not in ("in_distribution", "general"):
        raise ConfigError(f"retain={retain!r}: choose in_distribution or general")
    domain = preset if preset in PAPER_PRESETS[1:] else "arxiv"
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = _model_section()
    # Logical axis -> mesh axes (see jaxunlearn/sharding.py); the layers only ever name logical axes.
    # dcn_data > 1: multislice, the global data axis is data x dcn_data, its outer factor spanning dcn_data slices.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, rules=DEFAULT_RULES))
    c.data = _data_section(domain, retain)
    c.method = method_config(method)
    c.optim = _optim_section()
    c.train = _train_section()
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=10, keep=2, export=True, export_dtype=""))
    c.evaluation = _evaluation_section()
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods / multi-node GPU)
    # The built-in world, used wherever a path reads "world:<target|oracle|forget|retain|...>".
    c.world = ml_collections.ConfigDict(dict(cache_dir="", **dataclasses.asdict(WorldRecipe())))
    if preset == "builtin":
        _use_builtin_world(c, method, retain)
    elif preset not in PAPER_PRESETS:
        presets.apply(c, preset, retain)
    return c


def _optim_section() -> ml_collections.ConfigDict:
    """AdamW with warm-up and a schedule (the paper's)."""
    return ml_collections.ConfigDict(
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


def _train_section() -> ml_collections.ConfigDict:
    """Batching, length and logging of the train loop."""
    # Effective batch = micro_batch_size x grad_accum_steps chunks per optimizer step (paper, arXiv: 8 GPUs x 1
    # x 60 = 480 chunks of 4096 tokens; GitHub: 8 x 85 = 680).
    return ml_collections.ConfigDict(
        dict(
            micro_batch_size=8,  # global, split over the mesh axes of the `batch` rule (data x fsdp)
            grad_accum_steps=60,
            epochs=1,
            max_steps=0,  # > 0 overrides epochs
            logits_chunk_size=1024,  # positions per vocabulary-projection chunk in the losses
            # One forward/backward pass per split (forget, retain) of each micro-batch instead of one for both:
            # the same gradient and FLOPs, half the activation memory (what makes long chunks fit; see plan).
            split_passes=False,
            log_every=1,  # metrics.jsonl, and a progress line in log.txt (and on stderr without a terminal)
        )
    )


def _model_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
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


def _domain_split(domain: str, split: str) -> ml_collections.ConfigDict:
    """One split of a paper domain: the Hub data set's, or PG-19's in TFDS for ``books``."""
    if domain == "books":
        return split_config(BOOKS_SPLITS[split], column=BOOKS_COLUMN)
    return split_config(PAPER_DATASET, domain, split)


def _data_section(domain: str, retain: str) -> ml_collections.ConfigDict:
    retain_split = _domain_split(domain, "retain")
    if retain == "general":
        retain_split = split_config(PAPER_DATASET, "general", "retain")
    return ml_collections.ConfigDict(
        dict(
            max_length=4096,
            min_chunk_tokens=5,  # >= 2: a chunk needs a next-token target
            add_special_tokens=True,
            # How a question-answer split (one with a `question` column) lays out each record: a string with
            # {question} ending in {answer}, "chat[:SYSTEM PROMPT]" for the tokenizer's chat template, or "" for
            # "Question: {question}\nAnswer: {answer}".
            qa_template="",
            cache_dir="",  # default: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn
            forget=_domain_split(domain, "forget"),
            retain=retain_split,
            # Evaluation only: unseen same-domain documents (the MIA non-members and the "approximate
            # retraining" reference) and general held-out text. An empty path skips a split.
            approximate=_domain_split(domain, "approximate"),
            general=split_config(PAPER_DATASET, "general", "evaluation"),
            # Retain-set utility is measured on this split when given, else on `retain`.
            eval_retain=split_config(),
        )
    )


# The metrics a run computes by default, in report order (each is a module in jaxunlearn/evaluation/evaluators/).
DEFAULT_METRICS = (
    "perplexity",
    "memorization",
    "mia",
    "quantization",
    "relearning",
    "verbatim",
    "tasks",
    "oracle_distance",
)
# ``evaluation.attacks``: one switch for the attacks on unlearning, each the value it adds to its metric's option.
ATTACKS = {
    "relearn": ("relearning", "corpora", "forget"),  # fine-tune on held-out forget documents
    "relearn_related": ("relearning", "corpora", "retain"),  # fine-tune on related text (the retain split)
    "int8": ("quantization", "schemes", "int8"),
    "int4": ("quantization", "schemes", "int4"),
    "nf4": ("quantization", "schemes", "nf4"),
}


def parse_list(value: str) -> list[str]:
    """The items of a comma-separated setting, stripped, empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def metric_options(evaluation: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """``evaluation.<name>`` as plain values, with what ``evaluation.attacks`` adds to it (e.g. ``nf4`` to
    ``quantization.schemes``)."""
    options = evaluation[name].to_dict() if name in evaluation else {}
    for attack in parse_list(evaluation.get("attacks", "")):
        metric, option, value = ATTACKS[attack]
        if metric == name and value not in parse_list(options[option]):
            options[option] = ",".join(parse_list(options[option]) + [value])
    return options


def _evaluation_section() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict(
        dict(
            enabled=True,  # evaluate before and after unlearning and write report.json / report.md
            metrics=DEFAULT_METRICS,
            dtype="",  # compute dtype of every evaluation (default: model.dtype; the official code: float32)
            every_steps=0,  # also measure perplexities every N steps (0 = never during the run)
            batch_size=8,
            max_chunks=0,  # chunks per split (0 = all)
            in_run_max_chunks=64,  # chunks per split for the evaluations during the run
            oracle_model="",  # a model retrained without the forget set: an "oracle" column and distances to it
            # Stop unlearning once forget perplexity reaches a target, checked every `stop_every_steps` steps
            # (0 = at every `every_steps` evaluation) on the forget split alone (and the approximate one with
            # stop_approx_reference="current"), which is cheaper than a full evaluation:
            stop_every_steps=0,
            stop_forget_ppl=0.0,  # an absolute target
            stop_approx_multiple=0.0,  # or this multiple of the approximate split's perplexity, measured
            stop_approx_reference="start",  # at the start of unlearning, or at each check ("current")
            pretraining_tokens=3.0e12,  # for the compute ratio (Yi-6B: 3T tokens)
            # Attacks on the forgetting, run on every model (original, unlearned, oracle): a comma-separated list
            # from ATTACKS, e.g. "relearn,relearn_related,nf4" (= their metrics' own options; '' = none).
            attacks="",
        )
    )
    for name, metric in registered().items():  # each metric's options, e.g. config.evaluation.mia.ks
        if metric.options:
            e[name] = ml_collections.ConfigDict(metric.defaults())
    return e


# Learning rates for the built-in world, from the sweep of `python -m jaxunlearn.experiments.compare`.
BUILTIN_LR = {
    **{"ga": 3e-5, "random_label": 3e-5, "adversarial": 3e-5, "ga_gd": 1e-3, "ga_kl": 3e-4},
    **{"simnpo": 3e-4, "wga": 1e-3, "satimp": 1e-3},  # beyond the paper: the README's sweeps
    **{"rmu": 1e-3, "undial": 3e-3, "ce_u": 9e-4, "task_vector": 3e-4},
}
# Hyper-parameters set for the built-in world: SimNPO's margin gamma = beta x 5.5 nats, the best of 5.0-6.5 in the
# README's sweep (the world's text is at 4-5 nats per token, where gamma 0 leaves a gradient weight of
# sigmoid(-beta NLL) ~ 1e-8: nothing would be unlearned).
BUILTIN_HPARAMS = {
    "simnpo": {"gamma": 24.75},
    # RMU on the world's 4-layer model: steer the residual stream after layer 2 (width 128, norm ~15 there) and
    # train every parameter of layers 0-2 (the official recipe's three layers ending at the steered one; their MLP
    # down-projections alone barely move the model here). Its forget term keeps weight 1 and the retain weight
    # (alpha) is 10: at the official 100 nothing moves (the forget and retain text are the same kind of code), at 1
    # the retain perplexity explodes (README).
    "rmu": {
        "layer": 2,
        "trainable_params": r"model\.layers\.[0-2]\..*",
        "forget_weight": 1.0,
        "retain_weight": 10.0,
    },
    # UNDIAL and CE-U with the retain NLL term (weight 1, as GA+GD): without it the retain perplexity rises with
    # the forget perplexity and the membership AUC does not move (README).
    "undial": {"retain_weight": 1.0},
    "ce_u": {"retain_weight": 1.0},
}
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
    c.method.update(BUILTIN_HPARAMS.get(method, {}))
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
    e.verbatim.max_chunks = 64
    # The relearning attack: 50 steps at 3e-4 (1e-3 already damages the original model itself).
    e.relearning.update(lr=3e-4, steps=50, every=5)
    e.pretraining_tokens = float(c.world.steps * c.world.batch_size * c.world.max_length)


# --- validation -------------------------------------------------------------------------------------------


def flat_items(cfg: Any, prefix: str = "config") -> dict[str, Any]:
    """``{"config.section.key": value}`` for every leaf of a ConfigDict."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat_items(value, name))
        else:
            out[name] = value
    return out


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {requirement}")


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_POSITIVE = (lambda v: v > 0, "must be > 0")
_DTYPE = (lambda v: v in DTYPES, f"one of {DTYPES}")
_DTYPE_OR_DEFAULT = (lambda v: v in DTYPES + ("",), f"one of {DTYPES} or ''")
_MESH_AXIS = (lambda v: v >= 1 or v == -1, "positive, or -1 for the remaining devices")

# One-value checks: key -> (check, requirement).
RULES: dict[str, tuple[Any, str]] = {
    "config.model.path": (bool, "give a local Hugging Face directory or a Hub id"),
    "config.model.param_dtype": _DTYPE,
    "config.model.dtype": _DTYPE,
    "config.model.reference_dtype": _DTYPE_OR_DEFAULT,
    "config.mesh.data": _MESH_AXIS,
    "config.mesh.fsdp": _MESH_AXIS,
    "config.mesh.tensor": _MESH_AXIS,
    "config.mesh.dcn_data": (lambda v: v >= 1, ">= 1 (the number of slices the data axis spans)"),
    "config.data.max_length": (lambda v: v >= 2, "at least 2"),
    "config.data.forget.path": (bool, "the forget set is required"),
    **{f"config.data.{s}.max_documents": (_NON_NEGATIVE[0], ">= 0 (0 = all)") for s in DATA_SPLITS},
    "config.optim.lr": _POSITIVE,
    "config.optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "config.optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "config.optim.eps": _POSITIVE,
    "config.optim.weight_decay": (_NON_NEGATIVE[0], "must be >= 0"),
    "config.optim.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "config.optim.schedule": (lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
    "config.optim.clip_norm": (_NON_NEGATIVE[0], ">= 0 (0 disables clipping)"),
    "config.train.micro_batch_size": _AT_LEAST_1,
    "config.train.grad_accum_steps": _AT_LEAST_1,
    "config.train.epochs": _AT_LEAST_1,
    "config.train.max_steps": (_NON_NEGATIVE[0], ">= 0 (0 = use epochs)"),
    "config.train.logits_chunk_size": _AT_LEAST_1,
    "config.train.log_every": _AT_LEAST_1,
    "config.checkpoint.every_steps": (_NON_NEGATIVE[0], ">= 0 (0 = only at the end)"),
    "config.checkpoint.keep": _AT_LEAST_1,
    "config.checkpoint.export_dtype": _DTYPE_OR_DEFAULT,
    "config.evaluation.dtype": _DTYPE_OR_DEFAULT,
    "config.evaluation.batch_size": _AT_LEAST_1,
    "config.evaluation.in_run_max_chunks": _AT_LEAST_1,
    "config.evaluation.every_steps": _NON_NEGATIVE,
    "config.evaluation.max_chunks": _NON_NEGATIVE,
    "config.evaluation.stop_forget_ppl": (_NON_NEGATIVE[0], ">= 0 (0 = off)"),
    "config.evaluation.stop_approx_multiple": _NON_NEGATIVE,
    "config.evaluation.stop_approx_reference": (lambda v: v in ("start", "current"), "start or current"),
    "config.evaluation.stop_every_steps": _NON_NEGATIVE,
    "config.evaluation.pretraining_tokens": _NON_NEGATIVE,
    "config.world.general_eval_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "config.world.lr": _POSITIVE,
    **{f"config.world.{k}": _AT_LEAST_1 for k in WORLD_POSITIVE},
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` naming the first unknown key or bad value."""
    if "method" not in config or "name" not in config.method:
        raise ConfigError("config.method.name is missing")
    name = config.method.name
    _check(name in METHODS, "config.method.name", name, f"unknown method; known: {', '.join(sorted(METHODS))}")
    given = flat_items(config)
    _check_keys_and_types(given, flat_items(base_config(name)))
    for key, (check, requirement) in RULES.items():
        _check(check(given[key]), key, given[key], requirement)
    _check_method(config)
    _check_data(config)
    _check_evaluation(config)
    _check_world(config)
    _check_locations(given)
    try:
        normalize_rules(config.mesh.rules)
    except (MeshError, TypeError, ValueError) as e:
        raise ConfigError(f"config.mesh.rules: {e}") from e


# Settings that name a place: a local path, a Hub id, a ``world:`` name or a storage URL (gs://, file://, ...).
_LOCATION_KEYS = ("path", "tokenizer", "oracle_model", "cache_dir", "tfds_data_dir")


def _check_locations(given: dict[str, Any]) -> None:
    """A URL that cannot work (unsupported scheme, malformed, no storage client) is refused before any work."""
    from jaxunlearn.locations import LocationError, check

    for key, value in given.items():
        if key.rsplit(".", 1)[-1] in _LOCATION_KEYS and isinstance(value, str):
            try:
                check(value, key)
            except LocationError as e:
                raise ConfigError(str(e)) from None


def _check_keys_and_types(given: dict[str, Any], reference: dict[str, Any]) -> None:
    """Every key known and present, of its default's type; every float finite (``inf`` and ``nan`` parse)."""
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
        if isinstance(value, float):
            _check(math.isfinite(value), key, value, "must be a finite number")


def _check_method(config: ml_collections.ConfigDict) -> None:
    """Hyper-parameters are non-negative; a method that needs retain data (under its hyper-parameters) has it."""
    for hp, value in config.method.items():
        if hp != "name" and isinstance(value, (int, float)):
            _check(value >= 0, f"config.method.{hp}", value, "must be >= 0")
    name = config.method.name
    if config.method.get("forget_nll_cap_margin", 0.0):
        margin = config.method.forget_nll_cap_margin
        key = "config.method.forget_nll_cap_margin"
        _check(not config.method.forget_nll_cap, key, margin, "give forget_nll_cap or its margin, not both")
        needs = "derives the cap from the original's perplexity on the approximate split, so it needs"
        _check(config.evaluation.enabled, key, margin, f"{needs} config.evaluation.enabled=True")
        _check(bool(config.data.approximate.path), key, margin, f"{needs} config.data.approximate.path")
    if resolve_needs(config.method).retain:
        hparams = ", ".join(f"{k}={v}" for k, v in method_hparams(config.method).items())
        _check(
            bool(config.data.retain.path),
            "config.data.retain.path",
            config.data.retain.path,
            f"method {name} ({hparams}) trains a retain term and needs a retain set",
        )


def _check_data(config: ml_collections.ConfigDict) -> None:
    d = config.data
    _check(
        2 <= d.min_chunk_tokens <= d.max_length,
        "config.data.min_chunk_tokens",
        d.min_chunk_tokens,
        "in [2, max_length] (a chunk needs two tokens for one next-token target)",
    )
    if d.qa_template and any(d[split].get("question") for split in DATA_SPLITS):
        try:
            check_template(d.qa_template)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    from jaxunlearn.data import tfds_source

    for split in DATA_SPLITS:
        path = d[split].path
        if tfds_source.is_tfds_path(path):  # the selection's syntax; whether it is prepared is read with the data
            try:
                tfds_source.parse(path)
            except ValueError as e:
                raise ConfigError(f"config.data.{split}.path={path!r}: {e}") from None


def _check_evaluation(config: ml_collections.ConfigDict) -> None:
    """The metrics list and each metric's options, the stopping rule, and the built-in oracle's model."""
    e = config.evaluation
    metrics = registered()
    for name in e.metrics:
        # `--config.evaluation.metrics=a,b` arrives as ("a,b",): a tuple flag needs a Python literal
        hint = " (a list on the command line: \"--config.evaluation.metrics=('a','b')\")" if "," in name else ""
        _check(
            name in metrics,
            "config.evaluation.metrics",
            e.metrics,
            f"{name!r} is not a metric; known: {', '.join(sorted(metrics))}{hint}",
        )
    for attack in parse_list(e.attacks):
        _check(attack in ATTACKS, "config.evaluation.attacks", e.attacks, f"{attack!r} is not one of {tuple(ATTACKS)}")
    for name, metric in metrics.items():
        for option, spec in metric.options.items():
            value = e[name][option]
            if spec.check is not None:
                _check(spec.check(value), f"config.evaluation.{name}.{option}", value, spec.requirement)
    _check_attacks(config)
    if not e.enabled:
        return
    if e.stop_forget_ppl or e.stop_approx_multiple:
        _check(
            e.every_steps > 0 or e.stop_every_steps > 0,
            "config.evaluation.every_steps",
            e.every_steps,
            "the stopping rule needs every_steps or stop_every_steps > 0",
        )
    if e.stop_approx_multiple:
        path = config.data.approximate.path
        _check(bool(path), "config.data.approximate.path", path, "stop_approx_multiple needs the approximate split")
    if e.oracle_model.startswith("world:") and not config.model.path.startswith("world:"):
        raise ConfigError(
            f"config.model.path={config.model.path!r} with the built-in world's oracle "
            f"(config.evaluation.oracle_model={e.oracle_model!r}), which is a retrain of the built-in target only: "
            "for your own model use the paper's presets (e.g. --config=configs/ga_kl.py:arxiv, :github or :books), "
            "or set "
            "--config.evaluation.oracle_model to a model retrained without the forget set (or '' for none)"
        )


def _check_attacks(config: ml_collections.ConfigDict) -> None:
    """A relearning attack that is on has its metric listed and the splits it reads."""
    e = config.evaluation
    relearn = parse_list(metric_options(e, "relearning")["corpora"])
    if not relearn or not e.enabled:
        return
    _check(
        "relearning" in e.metrics,
        "config.evaluation.metrics",
        e.metrics,
        "the relearning attack is on (evaluation.attacks or relearning.corpora) but 'relearning' is not listed",
    )
    _check(bool(config.data.approximate.path), "config.data.approximate.path", "", "relearning measures the AUC on it")
    if "retain" in relearn:
        path = config.data.eval_retain.path or config.data.retain.path
        _check(bool(path), "config.data.retain.path", path, "relearning on related text reads the retain split")


def _check_world(config: ml_collections.ConfigDict) -> None:
    w = config.world
    _check(w.band_max_chars >= w.band_min_chars, "config.world.band_max_chars", w.band_max_chars, ">= band_min_chars")
    _check(w.hidden_size % w.num_heads == 0, "config.world.num_heads", w.num_heads, "must divide hidden_size")
