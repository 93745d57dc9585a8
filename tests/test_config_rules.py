"""Every config rule, in process: one row per rule, each a valid shipped config with one bad setting.

A row is ``(overrides, base, key, fragment)``: ``overrides`` maps dotted keys (relative to the config) to bad values
(``DELETE`` removes the key), ``base`` is a shipped config file with an optional preset (``"ga_gd_capped"``,
``"ga:arxiv"``), and :func:`jaxunlearn.config.validate` must raise :class:`ConfigError` whose message starts with
``key`` (followed by ``=``, ``:`` or a space) and contains ``fragment``. The expected keys are written out here, not
derived from the package, so that a rule that moves to another key or disappears fails its row.

The command line around these errors (one line, exit status 2, nothing written) is tested once, in
tests/test_cli.py (``test_bad_config_value_is_named``).
"""

import copy
import functools
import math

import ml_collections
import pytest

from jaxunlearn.config import ConfigError, validate
from tests.tiny_models import load_config_file

DELETE = object()  # an override that removes the key
HUB_MODEL = "01-ai/Yi-6B"  # the paper's presets take the model from the user


@functools.cache
def _loaded(base: str):
    name, _, preset = base.partition(":")
    config = load_config_file(name, preset or "builtin")
    if preset and preset != "builtin":
        config.model.path = HUB_MODEL
    return config


def base_config(base: str):
    """A fresh copy of the shipped config ``NAME[:preset]`` (the paper's presets with a Hub model)."""
    return copy.deepcopy(_loaded(base))


def with_overrides(config, overrides: dict):
    """``config`` with each dotted key set (or deleted), built afresh as a config file would build it: assigning to
    a ``ConfigDict`` casts (a bool to 1.0, a list to a tuple, even with ``ignore_type``), so a wrong type is only
    seen by the validation when the dict is built with it."""
    tree = config.to_dict()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = tree
        for part in parents:
            section = section[part]
        if value is DELETE:
            del section[leaf]
        else:
            section[leaf] = value
    return ml_collections.ConfigDict(tree)


def row(id_, overrides, key, fragment, base="ga", marks=()):
    return pytest.param(overrides, base, key, fragment, id=id_, marks=marks)


# The built-in world's recipe settings that must be >= 1 (world.check_config's WORLD_POSITIVE), listed here again.
WORLD_COUNTS = (
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
DATA_SPLITS = ("forget", "forget2", "retain", "approximate", "general", "eval_retain")

ROWS = [
    # --- generic: keys, types, finite numbers, the method's name (jaxunlearn/config/validation.py) ---------------
    row("unknown-key", {"optim.lrr": 1e-5}, "config.optim.lrr", "unknown config key"),
    row("unknown-top-level-key", {"sed": 1}, "config.sed", "unknown config key"),
    row("hparam-of-another-method", {"method.beta": 0.1}, "config.method.beta", "unknown config key"),
    row("missing-key", {"optim.lr": DELETE}, "config.optim.lr", "missing config key"),
    row("missing-metric-option", {"evaluation.mia.ks": DELETE}, "config.evaluation.mia.ks", "missing config key"),
    row("missing-method-name", {"method.name": DELETE}, "config.method.name", "is missing"),
    row("unknown-method", {"method.name": "gradient_ascent"}, "config.method.name", "unknown method; known:"),
    row("str-for-float", {"optim.lr": "1e-5"}, "config.optim.lr", "must be a float"),
    row("float-for-int", {"train.epochs": 1.5}, "config.train.epochs", "=1.5: must be a"),
    row("bool-for-float", {"optim.clip_norm": True}, "config.optim.clip_norm", "must be a float"),
    row("int-for-str", {"model.path": 7}, "config.model.path", "must be a str"),
    row("str-for-tuple", {"evaluation.metrics": "perplexity"}, "config.evaluation.metrics", "must be a tuple"),
    row("list-for-tuple", {"evaluation.metrics": ["perplexity"]}, "config.evaluation.metrics", "must be a tuple"),
    row("bool-for-int", {"train.epochs": True}, "config.train.epochs", "=True: must be a"),
    row("bool-for-max-steps", {"train.max_steps": True}, "config.train.max_steps", "=True: must be a int"),
    row("str-for-hparam", {"method.forget_weight": "high"}, "config.method.forget_weight", "must be a float", "ga_gd"),
    row("infinite-lr", {"optim.lr": math.inf}, "config.optim.lr", "must be a finite number"),
    row("negative-seed", {"seed": -1}, "config.seed", ">= 0"),
    row("nan-world-lr", {"world.lr": math.nan}, "config.world.lr", "must be a finite number"),
    row(
        "minus-infinite-cap",
        {"method.forget_nll_cap": -math.inf},
        "config.method.forget_nll_cap",
        "must be a finite number",
    ),
    # --- method (jaxunlearn/methods/registry.py) -----------------------------------------------------------------
    row("negative-hparam", {"method.retain_weight": -1.0}, "config.method.retain_weight", "must be >= 0", "ga_gd"),
    row("negative-int-hparam", {"method.layer": -1}, "config.method.layer", "must be >= 0", "rmu"),
    row(
        "cap-and-its-margin",
        {"method.forget_nll_cap": 5.0},
        "config.method.forget_nll_cap_margin",
        "give forget_nll_cap or its margin, not both",
        "ga_gd_capped",
    ),
    # --- model (jaxunlearn/models/__init__.py) -------------------------------------------------------------------
    row("no-model", {"model.path": ""}, "config.model.path", "give a local Hugging Face directory or a Hub id"),
    row("param-dtype", {"model.param_dtype": "float13"}, "config.model.param_dtype", "one of ("),
    row("compute-dtype", {"model.dtype": "int8"}, "config.model.dtype", "one of ("),
    row("reference-dtype", {"model.reference_dtype": "fp16"}, "config.model.reference_dtype", "or ''"),
    row("remat", {"model.remat": "everything"}, "config.model.remat", "one of ('none', 'full', 'dots'"),
    row("attention-impl", {"model.attention_impl": "flash"}, "config.model.attention_impl", "one of ('xla', 'dot_"),
    # --- mesh (jaxunlearn/parallel/sharding.py) ------------------------------------------------------------------
    row("mesh-data-zero", {"mesh.data": 0}, "config.mesh.data", "positive, or -1"),
    row("mesh-fsdp-minus-2", {"mesh.fsdp": -2}, "config.mesh.fsdp", "positive, or -1"),
    row("mesh-tensor-zero", {"mesh.tensor": 0}, "config.mesh.tensor", "positive, or -1"),
    row("mesh-dcn-fill", {"mesh.dcn_data": -1}, "config.mesh.dcn_data", ">= 1 (the number of slices"),
    row("rule-not-a-pair", {"mesh.rules": (("batch",),)}, "config.mesh.rules", "expected a (logical_axis, mesh_axes)"),
    row("rule-axis-not-a-name", {"mesh.rules": ((1, "data"),)}, "config.mesh.rules", "expected a (logical_axis"),
    row("rule-unknown-mesh-axis", {"mesh.rules": (("batch", "pod"),)}, "config.mesh.rules", "unknown mesh axis"),
    row("rules-empty", {"mesh.rules": ()}, "config.mesh.rules", "an empty table shards nothing"),
    row("rule-empty-axis-name", {"mesh.rules": (("", "fsdp"),)}, "config.mesh.rules", "logical axis name is empty"),
    row(
        "rule-axis-twice",
        {"mesh.rules": (("batch", "data"), ("batch", "fsdp"))},
        "config.mesh.rules",
        "logical axis 'batch' has a rule already",
    ),
    # --- data (jaxunlearn/data/settings.py) ----------------------------------------------------------------------
    row("max-length-1", {"data.max_length": 1}, "config.data.max_length", "at least 2"),
    row("no-forget-set", {"data.forget.path": ""}, "config.data.forget.path", "the forget set is required"),
    *[
        row(f"{split}-max-documents", {f"data.{split}.max_documents": -1}, f"config.data.{split}.max_documents", ">= 0")
        for split in DATA_SPLITS
    ],
    row("one-token-chunks", {"data.min_chunk_tokens": 1}, "config.data.min_chunk_tokens", "in [2, max_length]"),
    row(
        "min-chunk-over-max-length",
        {"data.max_length": 64, "data.min_chunk_tokens": 65},
        "config.data.min_chunk_tokens",
        "in [2, max_length]",
    ),
    row(
        "qa-template-misspelt-field",
        {"data.forget.question": "question", "data.qa_template": "Q: {questoin}\nA: {answer}"},
        "config.data.qa_template",
        "needs one {question} field",
    ),
    row(
        "qa-template-answer-not-last",
        {"data.retain.question": "question", "data.qa_template": "Q: {question}\nA: {answer}."},
        "config.data.qa_template",
        "one {answer} field at its very end",
        "ga_gd",
    ),
    row(
        "qa-template-unknown-field",
        {"data.forget.question": "question", "data.qa_template": "Q: {question} ({topic})\nA: {answer}"},
        "config.data.qa_template",
        "no other field ({topic}: only {question} and {answer} are filled in)",
    ),
    row(
        "qa-template-context-field",
        {"data.forget.question": "question", "data.qa_template": "Context: {context}\nQ: {question}\nA: {answer}"},
        "config.data.qa_template",
        "{context}",
    ),
    row(
        "first-tokens-two-for-one-topic",
        {"data.first_tokens": (512, 768)},
        "config.data.first_tokens",
        "one length >= 2 per forget topic (1: forget)",
        "rmu:wmdp",
    ),
    row(
        "first-tokens-one-for-two-topics",
        {"data.first_tokens": (512,)},
        "config.data.first_tokens",
        "one length >= 2 per forget topic (2: forget, forget2)",
        "rmu:wmdp_bio_cyber",
    ),
    row(
        "first-tokens-one-token",
        {"data.first_tokens": (512, 1)},
        "config.data.first_tokens",
        "one length >= 2 per forget topic",
        "rmu:wmdp_bio_cyber",
    ),
    row(
        "forget2-question-answer",
        {"data.forget2.question": "question"},
        "config.data.forget2.question",
        "forget2 is plain text only",
        "rmu:wmdp_bio_cyber",
    ),
    row(
        "tfds-no-split",
        {"data.forget.path": "tfds:pg19"},
        "config.data.forget.path",
        "not a TFDS selection: write tfds:NAME[/CONFIG][:VERSION]:SPLIT",
    ),
    row(
        "tfds-bad-split-expression",
        {"data.approximate.path": "tfds:pg19:train[:5%"},
        "config.data.approximate.path",
        "is not a TFDS split expression",
    ),
    row(
        "tfds-comma-joined-splits",
        {"data.retain.path": "tfds:pg19:train,test"},
        "config.data.retain.path",
        "join splits with '+'",
    ),
    # --- optim and train (jaxunlearn/training/step.py) -----------------------------------------------------------
    row("lr-zero", {"optim.lr": 0.0}, "config.optim.lr", "must be > 0"),
    row("lr-negative", {"optim.lr": -1.0}, "config.optim.lr", "must be > 0", "ga_kl"),
    row("b1-one", {"optim.b1": 1.0}, "config.optim.b1", "in [0, 1)"),
    row("b2-negative", {"optim.b2": -0.1}, "config.optim.b2", "in [0, 1)"),
    row("eps-zero", {"optim.eps": 0.0}, "config.optim.eps", "must be > 0"),
    row("weight-decay", {"optim.weight_decay": -0.1}, "config.optim.weight_decay", "must be >= 0"),
    row("warmup-ratio-one", {"optim.warmup_ratio": 1.0}, "config.optim.warmup_ratio", "in [0, 1)"),
    row("schedule", {"optim.schedule": "exponential"}, "config.optim.schedule", "one of ('cosine'"),
    row("clip-norm", {"optim.clip_norm": -1.0}, "config.optim.clip_norm", ">= 0 (0 disables clipping)"),
    row("micro-batch", {"train.micro_batch_size": 0}, "config.train.micro_batch_size", ">= 1"),
    row("grad-accum", {"train.grad_accum_steps": 0}, "config.train.grad_accum_steps", ">= 1"),
    row("epochs", {"train.epochs": 0}, "config.train.epochs", ">= 1"),
    row("max-steps", {"train.max_steps": -1}, "config.train.max_steps", ">= 0 (0 = use epochs)"),
    row("logits-chunk", {"train.logits_chunk_size": 0}, "config.train.logits_chunk_size", ">= 1"),
    row("log-every", {"train.log_every": 0}, "config.train.log_every", ">= 1"),
    # --- checkpoint (jaxunlearn/storage/checkpoints.py) ----------------------------------------------------------
    row("checkpoint-every", {"checkpoint.every_steps": -1}, "config.checkpoint.every_steps", ">= 0 (0 = only at"),
    row("checkpoint-minutes", {"checkpoint.every_minutes": -5.0}, "config.checkpoint.every_minutes", ">= 0 (0 = off)"),
    row("checkpoint-keep", {"checkpoint.keep": 0}, "config.checkpoint.keep", ">= 1"),
    row("export-dtype", {"checkpoint.export_dtype": "int8"}, "config.checkpoint.export_dtype", "or ''"),
    # --- evaluation (jaxunlearn/evaluation/settings.py and each metric's options) --------------------------------
    row("eval-dtype", {"evaluation.dtype": "fp8"}, "config.evaluation.dtype", "or ''"),
    row("eval-batch", {"evaluation.batch_size": 0}, "config.evaluation.batch_size", ">= 1"),
    row("in-run-chunks", {"evaluation.in_run_max_chunks": 0}, "config.evaluation.in_run_max_chunks", ">= 1"),
    row("eval-every", {"evaluation.every_steps": -1}, "config.evaluation.every_steps", ">= 0"),
    row("eval-max-chunks", {"evaluation.max_chunks": -1}, "config.evaluation.max_chunks", ">= 0"),
    row("stop-forget-ppl", {"evaluation.stop_forget_ppl": -1.0}, "config.evaluation.stop_forget_ppl", "(0 = off)"),
    row(
        "stop-approx-multiple",
        {"evaluation.stop_approx_multiple": -1.0},
        "config.evaluation.stop_approx_multiple",
        ">= 0",
    ),
    row(
        "stop-reference",
        {"evaluation.stop_approx_reference": "end"},
        "config.evaluation.stop_approx_reference",
        "start or current",
    ),
    row("stop-every", {"evaluation.stop_every_steps": -1}, "config.evaluation.stop_every_steps", ">= 0"),
    row("pretraining-tokens", {"evaluation.pretraining_tokens": -1.0}, "config.evaluation.pretraining_tokens", ">= 0"),
    row(
        "unknown-metric",
        {"evaluation.metrics": ("perplexity", "rouge")},
        "config.evaluation.metrics",
        "'rouge' is not a metric",
    ),
    row(
        "metrics-as-one-string",
        {"evaluation.metrics": ("perplexity,mia",)},
        "config.evaluation.metrics",
        "a list on the command line",
    ),
    row(
        "unknown-attack",
        {"evaluation.attacks": "relearn,quant4"},
        "config.evaluation.attacks",
        "'quant4' is not one of",
    ),
    row("mia-ks-zero", {"evaluation.mia.ks": (0.0, 0.2)}, "config.evaluation.mia.ks", "fractions in (0, 1]"),
    row("mia-ks-over-one", {"evaluation.mia.ks": (0.2, 1.5)}, "config.evaluation.mia.ks", "fractions in (0, 1]"),
    row("mia-retrained-auc", {"evaluation.mia.retrained_auc": 1.5}, "config.evaluation.mia.retrained_auc", "in [0, 1]"),
    row("mia-gradnorm", {"evaluation.mia.gradnorm": "l3"}, "config.evaluation.mia.gradnorm", "('' = off)"),
    row("mia-privleak", {"evaluation.mia.privleak": "yes"}, "config.evaluation.mia.privleak", "bool"),
    row(
        "muse-retrained-auc",
        {"evaluation.muse.retrained_auc": -0.1},
        "config.evaluation.muse.retrained_auc",
        "in [0, 1]",
    ),
    row(
        "muse-privleak-max-tokens",
        {"evaluation.muse.privleak_max_tokens": -1},
        "config.evaluation.muse.privleak_max_tokens",
        ">= 0",
    ),
    row(
        "muse-privleak-split",
        {"evaluation.muse.privleak_forget": "x"},
        "config.evaluation.muse.privleak_forget",
        "CONFIG:SPLIT",
    ),
    row("muse-split-spec", {"evaluation.muse.verbmem": "verbmem"}, "config.evaluation.muse.verbmem", "CONFIG:SPLIT"),
    row(
        "muse-new-tokens",
        {"evaluation.muse.knowmem_new_tokens": 0},
        "config.evaluation.muse.knowmem_new_tokens",
        ">= 1",
    ),
    row(
        "quantization-scheme",
        {"evaluation.quantization.schemes": "int3"},
        "config.evaluation.quantization.schemes",
        "comma-separated from",
    ),
    row(
        "relearning-corpus",
        {"evaluation.relearning.corpora": "pretraining"},
        "config.evaluation.relearning.corpora",
        "comma-separated from",
    ),
    row("relearning-lr", {"evaluation.relearning.lr": 0.0}, "config.evaluation.relearning.lr", "must be > 0"),
    row(
        "relearning-holdout",
        {"evaluation.relearning.holdout_fraction": 1.0},
        "config.evaluation.relearning.holdout_fraction",
        "in (0, 1)",
    ),
    row("tasks-max-items", {"evaluation.tasks.max_items": -1}, "config.evaluation.tasks.max_items", ">= 0"),
    row(
        "tasks-add-bos",
        {"evaluation.tasks.add_bos_token": "yes"},
        "config.evaluation.tasks.add_bos_token",
        "true or false",
    ),
    row("tofu-forget-set", {"evaluation.tofu.forget": ""}, "config.evaluation.tofu.forget", "configuration"),
    row(
        "tofu-template",
        {"evaluation.tofu.template": "Q: {question}"},
        "config.evaluation.tofu.template",
        "{answer} at its end",
    ),
    row(
        "tofu-literal-template",
        {"evaluation.tofu.template": "literal:Q: {question}\nA: {answer}."},
        "config.evaluation.tofu.template",
        "{answer} at its end",
    ),
    row(
        "tofu-question-key",
        {"evaluation.tofu.question_key": "paraphrased_answer"},
        "config.evaluation.tofu.question_key",
        "question or paraphrased_question",
    ),
    row("tofu-max-items", {"evaluation.tofu.max_items": -1}, "config.evaluation.tofu.max_items", ">= 0"),
    row(
        "tofu-qa-template",
        {"data.qa_template": "literal:[INST] {question} [/INST]"},
        "config.data.qa_template",
        "{answer} field at its very end",
        "ga_gd:tofu",
    ),
    row(
        "verbatim-prompt", {"evaluation.verbatim.prompt_tokens": 0}, "config.evaluation.verbatim.prompt_tokens", ">= 1"
    ),
    row(
        "stopping-rule-never-checked",
        {"evaluation.stop_forget_ppl": 20.0},
        "config.evaluation.every_steps",
        "the stopping rule needs every_steps or stop_every_steps > 0",
        "ga:arxiv",
    ),
    row(
        "approx-stopping-rule-never-checked",
        {"evaluation.every_steps": 0, "evaluation.stop_every_steps": 0},
        "config.evaluation.every_steps",
        "the stopping rule needs every_steps or stop_every_steps > 0",
    ),
    # --- world (jaxunlearn/world/build.py) -----------------------------------------------------------------------
    row("world-eval-fraction", {"world.general_eval_fraction": 1.0}, "config.world.general_eval_fraction", "in (0, 1)"),
    row("world-lr", {"world.lr": 0.0}, "config.world.lr", "must be > 0"),
    *[row(f"world-{name}", {f"world.{name}": 0}, f"config.world.{name}", ">= 1") for name in WORLD_COUNTS],
    row("world-band", {"world.band_max_chars": 1000}, "config.world.band_max_chars", ">= band_min_chars"),
    row("world-heads", {"world.num_heads": 3}, "config.world.num_heads", "must divide hidden_size"),
    row("world-kv-heads", {"world.num_kv_heads": 3}, "config.world.num_kv_heads", "must divide num_heads (4)"),
    row("world-seed", {"world.seed": -1}, "config.world.seed", ">= 0"),
    # --- across sections (jaxunlearn/config/validation.py) -------------------------------------------------------
    row(
        "ga-gd-without-retain-set",
        {"data.retain.path": ""},
        "config.data.retain.path",
        "method ga_gd (forget_weight=0.15, retain_weight=1.0, forget_nll_cap=0.0, forget_nll_cap_margin=0.0) trains a "
        "retain term and needs a retain set",
        "ga_gd",
    ),
    row(
        "ga-kl-general-without-retain-set",
        {"data.retain.path": ""},
        "config.data.retain.path",
        "method ga_kl (",
        "ga_kl_general:arxiv",
    ),
    row(
        "forget2-with-a-one-topic-method",
        {"data.forget2.path": "cais/wmdp-corpora"},
        "config.data.forget2.path",
        "method npo has one forget term; a second forget topic needs per-topic hyper-parameters, which only rmu has",
        "npo",
    ),
    row(
        "npo-retain-weight-without-retain-set",
        {"method.retain_weight": 0.5, "data.retain.path": ""},
        "config.data.retain.path",
        "method npo (beta=0.1, retain_weight=0.5) trains a retain term",
        "npo",
    ),
    row(
        "cap-margin-without-evaluation",
        {"evaluation.enabled": False},
        "config.method.forget_nll_cap_margin",
        "needs config.evaluation.enabled=True",
        "ga_gd_capped",
    ),
    row(
        "cap-margin-without-approximate-split",
        {"data.approximate.path": ""},
        "config.method.forget_nll_cap_margin",
        "needs config.data.approximate.path",
        "ga_gd_capped:arxiv",
    ),
    row(
        "relearn-attack-without-its-metric",
        {"evaluation.attacks": "relearn", "evaluation.metrics": ("perplexity", "mia")},
        "config.evaluation.metrics",
        "'relearning' is not listed",
        "ga:arxiv",
    ),
    row(
        "relearn-attack-without-approximate-split",
        {"evaluation.attacks": "relearn", "data.approximate.path": ""},
        "config.data.approximate.path",
        "relearning measures the AUC on it",
        "ga:arxiv",
    ),
    row(
        "relearning-corpora-without-approximate-split",
        {"evaluation.relearning.corpora": "forget", "data.approximate.path": ""},
        "config.data.approximate.path",
        "relearning measures the AUC on it",
        "ga:arxiv",
    ),
    row(
        "relearn-related-without-retain-split",
        {"evaluation.attacks": "relearn_related, nf4", "data.retain.path": ""},
        "config.data.retain.path",
        "relearning on related text reads the retain split",
        "ga:arxiv",
    ),
    row(
        "stop-approx-multiple-without-approximate-split",
        {"data.approximate.path": ""},
        "config.data.approximate.path",
        "stop_approx_multiple needs the approximate split",
    ),
    row(
        "builtin-oracle-with-own-model",
        {"model.path": HUB_MODEL},
        "config.model.path",
        "with the built-in world's oracle (config.evaluation.oracle_model='world:oracle')",
    ),
    row(
        "builtin-oracle-in-paper-preset",
        {"evaluation.oracle_model": "world:oracle"},
        "config.model.path",
        "for your own model use the paper's presets",
        "ga_kl:arxiv",
    ),
    # --- places: local paths, Hub ids, world: names, storage URLs (jaxunlearn/config/validation.py) ---------------
    row(
        "http-model",
        {"model.path": "http://example.com/yi"},
        "config.model.path",
        "unsupported URL scheme http://",
        "ga:arxiv",
    ),
    row("gs-one-slash", {"data.cache_dir": "gs:/bucket/cache"}, "config.data.cache_dir", "malformed URL; write gs://"),
    row("gs-bad-bucket", {"world.cache_dir": "gs://Not_A_Bucket/w"}, "config.world.cache_dir", "is not a bucket"),
    row(
        "file-url-with-host",
        {"model.tokenizer": "file://host/tokenizer"},
        "config.model.tokenizer",
        "write file:///ABSOLUTE/PATH",
        "ga:arxiv",
    ),
    row(
        "package-not-installed",
        {"evaluation.oracle_model": "package:no_such_package_xyz/model"},
        "config.evaluation.oracle_model",
        "Python package 'no_such_package_xyz' is not installed",
        "ga:arxiv",
    ),
    row(
        "one-bad-path-of-several",
        {"data.forget.tfds_data_dir": "/data/tfds,s3:bucket"},
        "config.data.forget.tfds_data_dir",
        "malformed URL; write s3://",
    ),
]


@pytest.mark.parametrize(("overrides", "base", "key", "fragment"), ROWS)
def test_config_rule(overrides, base, key, fragment):
    config = base_config(base)
    validate(with_overrides(config, {}))  # the row's base is valid: the error below is the override's
    with pytest.raises(ConfigError) as raised:
        validate(with_overrides(config, overrides))
    message = str(raised.value)
    assert message.startswith(key) and message[len(key)] in "=: ", message  # the whole key, first
    assert fragment in message, message


def test_every_shipped_config_is_valid_as_shipped():
    """The rows' bases: every shipped config file validates unmodified (the built-in world), and with a model in the
    paper's arXiv preset."""
    from jaxunlearn.commands.cli import config_files

    names = list(config_files())
    assert {"ga", "ga_gd", "ga_gd_capped", "ga_kl_general", "npo", "rmu"} <= set(names)  # the rows' bases
    for name in names:
        validate(load_config_file(name))
        validate(base_config(f"{name}:arxiv"))
