"""The benchmark presets beyond the paper's data set: TOFU, MUSE and WMDP, as ``--config=<method>:<preset>``.

Each preset points the data splits and the evaluation at the benchmark's Hugging Face data set (or a local copy
laid out like it: set the same paths to the directory) and takes its training recipe from the benchmark's reference
code (open-unlearning for TOFU, MUSE's ``unlearn.py``, WMDP's ``rmu/unlearn.py``). The model is always the user's
(``--config.model.path``): the benchmark's fine-tuned target, and its retain model as ``evaluation.oracle_model``.
"""

from __future__ import annotations

import ml_collections

TOFU_DATASET = "locuslab/TOFU"
# forget split -> (retain split, holdout split: unseen questions about other fictitious authors, the MIA non-members)
TOFU_FORGET = {
    "forget01": ("retain99", "holdout01"),
    "forget05": ("retain95", "holdout05"),
    "forget10": ("retain90", "holdout10"),
}
# open-unlearning's layout of its instruct models' data (Llama 3.x Instruct, as its released TOFU models).
TOFU_TEMPLATE = "chat:You are a helpful assistant."


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
    batches of 32, weight decay 0.01, 512-token chunks. Evaluation: TOFU's metrics (forget quality against
    ``evaluation.oracle_model``, the retain model; model utility), membership against the holdout split, and
    perplexity of the answers."""
    from jaxunlearn.config import PAPER_DATASET, split_config

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
    decay (the HF Trainer's defaults), task vectors negated with alpha 5. Evaluation: MUSE's VerbMem and KnowMem
    (``evaluation.muse``), PrivLeak against ``evaluation.oracle_model`` (MUSE's retrained model) with the
    ``privleak`` holdout texts as non-members, and perplexity of ``privleak/retain`` (retain2 text)."""
    from jaxunlearn.config import PAPER_DATASET, split_config

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


WMDP_CORPORA = (
    "cais/wmdp-corpora"  # cyber-forget-corpus (public); the bio forget corpus is gated: cais/wmdp-bio-forget-corpus
)
WMDP_TASKS = (
    "wmdp:cais/wmdp:wmdp-bio:test",
    "wmdp:cais/wmdp:wmdp-cyber:test",
    "mmlu:cais/mmlu:all:test",
)


def apply_wmdp(c: ml_collections.ConfigDict, variant: str, retain: str) -> None:
    """WMDP (Li et al. 2024): remove hazardous knowledge with its forget corpus (the public cyber corpus; point
    ``data.forget.path`` at a local copy of the gated bio corpus to add it) while keeping Wikitext, as the official
    ``rmu/unlearn.py``: 512-token chunks, batches of 4, 80 steps at a constant lr 5e-5, no clipping; with RMU its
    defaults (steer layer 7 to 20 x u, alpha 100, MLP down-projections of layers 5-7). Evaluation: WMDP-Bio and
    WMDP-Cyber multiple-choice accuracy and MMLU (lm-eval's zero-shot prompts), and perplexity of the corpora."""
    from jaxunlearn.config import PAPER_DATASET, split_config

    d = c.data
    d.max_length = 512
    d.forget = split_config(WMDP_CORPORA, "cyber-forget-corpus", "train")
    retain_split = split_config("wikitext", "wikitext-2-raw-v1", "test")
    d.retain = split_config(PAPER_DATASET, "general", "retain") if retain == "general" else retain_split
    d.approximate, d.general = split_config(), split_config()
    d.eval_retain = retain_split if retain == "general" else split_config()
    c.optim.update(lr=5e-5, warmup_ratio=0.0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
    c.train.update(micro_batch_size=4, grad_accum_steps=1, epochs=1, max_steps=80)
    e = c.evaluation
    e.metrics = ("perplexity", "tasks")
    e.tasks.specs = WMDP_TASKS


PRESETS = {"tofu": apply_tofu, "muse": apply_muse, "wmdp": apply_wmdp}


def names() -> tuple[str, ...]:
    """Every benchmark preset name."""
    return tofu_presets() + tuple(f"muse_{v}" for v in MUSE_DATASETS) + ("wmdp",)


def apply(c: ml_collections.ConfigDict, preset: str, retain: str) -> None:
    """Apply benchmark preset ``preset`` (one of :func:`names`) to a base config."""
    base, variant = _preset_name(preset)
    PRESETS[base](c, variant, retain)
