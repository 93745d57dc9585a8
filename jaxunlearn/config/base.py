"""The one base configuration every ``configs/*.py`` file is composed from: each section's defaults.

Config files are ml-collections ``get_config()`` files; any field can be overridden on the command line
(``--config.optim.lr=1e-5``). :func:`jaxunlearn.config.validate` checks a config before any work.
"""

from __future__ import annotations

import dataclasses

import ml_collections

import jaxunlearn.config.builtin as builtin
import jaxunlearn.config.presets as presets
from jaxunlearn.config.sources import PAPER_DATASET, domain_split, split_config
from jaxunlearn.errors import ConfigError
from jaxunlearn.evaluation import settings as evaluation_settings
from jaxunlearn.methods.registry import get_method
from jaxunlearn.models import lora
from jaxunlearn.parallel.sharding import DEFAULT_RULES
from jaxunlearn.world.build import WorldRecipe


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
    :mod:`jaxunlearn.config.presets`. Config files pass the preset through:
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
    # Logical axis -> mesh axes (see jaxunlearn/parallel/sharding.py); the layers only ever name logical axes.
    # dcn_data > 1: multislice, the global data axis is data x dcn_data, its outer factor spanning dcn_data slices.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, rules=DEFAULT_RULES))
    c.data = _data_section(domain, retain)
    c.method = method_config(method)
    c.optim = _optim_section()
    c.train = _train_section()
    # LoRA: rank > 0 trains low-rank adapters over a frozen base in base_dtype (see jaxunlearn/models/lora.py).
    c.lora = ml_collections.ConfigDict(lora.default_config())
    # Checkpoints every `every_steps` steps, and after the first step that ends `every_minutes` minutes after the last
    # one (0 = off): a preemption or a signal loses at most that much work (SIGTERM/SIGINT checkpoint the current
    # step, but only once it ends: a long step may outlast a preemption's notice).
    c.checkpoint = ml_collections.ConfigDict(
        dict(every_steps=10, every_minutes=0.0, keep=2, export=True, export_dtype="")
    )
    c.evaluation = evaluation_settings.default_config()
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods / multi-node GPU)
    # The built-in world, used wherever a path reads "world:<target|oracle|forget|retain|...>".
    c.world = ml_collections.ConfigDict(dict(cache_dir="", **dataclasses.asdict(WorldRecipe())))
    if preset == "builtin":
        builtin.use_builtin_world(c, method, retain)
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


def _data_section(domain: str, retain: str) -> ml_collections.ConfigDict:
    retain_split = domain_split(domain, "retain")
    if retain == "general":
        retain_split = split_config(PAPER_DATASET, "general", "retain")
    return ml_collections.ConfigDict(
        dict(
            max_length=4096,
            min_chunk_tokens=5,  # >= 2: a chunk needs a next-token target
            add_special_tokens=True,
            # How a question-answer split (one with a `question` column) lays out each record: a string with
            # {question} ending in {answer} (after "literal:": the whitespace before {answer} stays in the prompt),
            # "chat[:SYSTEM PROMPT]" for the tokenizer's chat template, "auto" for the model's TOFU format as
            # open-unlearning picks it, or "" for "Question: {question}\nAnswer: {answer}".
            qa_template="",
            cache_dir="",  # default: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn
            forget=domain_split(domain, "forget"),
            # A second forget topic, alternating with `forget` step by step in file order (RMU on WMDP's two
            # corpora, as the official rmu/unlearn.py); an empty path = one forget set. Methods with per-topic
            # hyper-parameters only (rmu).
            forget2=split_config(),
            # () = off: documents cut into max_length-token chunks. Else one length per forget topic (forget,
            # forget2): each non-empty document is one chunk, its first N tokens, and so is each retain document
            # (its first max_length tokens), as the official RMU's get_data and tokenizer truncation.
            first_tokens=(),
            retain=retain_split,
            # Evaluation only: unseen same-domain documents (the MIA non-members and the "approximate
            # retraining" reference) and general held-out text. An empty path skips a split.
            approximate=domain_split(domain, "approximate"),
            general=split_config(PAPER_DATASET, "general", "evaluation"),
            # Retain-set utility is measured on this split when given, else on `retain`.
            eval_retain=split_config(),
        )
    )
