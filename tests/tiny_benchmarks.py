"""Tiny local copies of the benchmarks' Hugging Face data sets, with their real schemas (configurations, splits
and columns), made from the tiny tokenizer's words so that every token is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.tiny_models import WORDS

# A chat template for the tiny tokenizer: each turn "<s>role content</s>", the assistant's prompt "<s>assistant".
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)


def few_small_steps(config, max_steps: int):
    """``config`` set to ``max_steps`` optimizer steps of 4 chunks at lr 1e-3 on the tests' 4 x 2 fake CPU devices."""
    config.train.update(micro_batch_size=4, grad_accum_steps=1, max_steps=max_steps)
    config.optim.lr = 1e-3
    config.mesh.fsdp, config.mesh.tensor = 4, 2
    return config


def phrase(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def write_hf_dataset(root: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A directory laid out as a Hub data set: one JSON-lines file per (configuration, split) and a dataset card
    listing them, as ``datasets.load_dataset(root, name, split=split)`` reads it."""
    root.mkdir(parents=True, exist_ok=True)
    card = ["---", "configs:"]
    for name, splits in configs.items():
        card += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            path = root / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            card += [f"  - split: {split}", f"    path: {name}/{split}.jsonl"]
    (root / "README.md").write_text("\n".join(card + ["---", "", "A tiny local copy.", ""]))
    return root


def write_tofu(root: Path, seed: int = 0, per_set: int = 6) -> Path:
    """TOFU's layout (``locuslab/TOFU``): forget10/retain90/holdout10 (question, answer) and the ``*_perturbed``
    evaluation sets (question, answer, paraphrased_answer, perturbed_answer: a list; real authors and world facts
    also carry option1-4; the forget and retain sets paraphrased_question)."""
    rng = np.random.default_rng(seed)
    paraphrases = np.random.default_rng(seed + 1000)  # its own stream: the other columns stay as they were

    def qa(n: int) -> list[dict]:
        return [{"question": phrase(rng, 4), "answer": phrase(rng, 6)} for _ in range(n)]

    def perturbed(rows: list[dict], options: bool = False) -> list[dict]:
        out = []
        for r in rows:
            row = {**r, "paraphrased_answer": phrase(rng, 6), "perturbed_answer": [phrase(rng, 6) for _ in range(3)]}
            if options:
                row.update({f"option{i}": phrase(rng, 2) for i in range(1, 5)})
            out.append(row)
        return out

    def paraphrased(rows: list[dict]) -> list[dict]:
        return [{**r, "paraphrased_question": phrase(paraphrases, 5)} for r in rows]

    forget, retain, holdout = qa(per_set), qa(2 * per_set), qa(per_set)
    configs = {
        "forget10": {"train": forget},
        "retain90": {"train": retain},
        "holdout10": {"train": holdout},
        "forget10_perturbed": {"train": paraphrased(perturbed(forget))},
        "retain_perturbed": {"train": paraphrased(perturbed(retain[:per_set]))},
        "real_authors_perturbed": {"train": perturbed(qa(per_set), options=True)},
        "world_facts_perturbed": {"train": perturbed(qa(per_set), options=True)},
    }
    return write_hf_dataset(root, configs)


def write_muse(root: Path, seed: int = 0) -> Path:
    """MUSE's layout (``muse-bench/MUSE-News``): raw text (forget, retain1, retain2, holdout), verbmem (prompt, gt),
    knowmem (forget_qa, retain_qa and their *_icl examples: question, answer), privleak (forget, retain, holdout)
    and the scal/sust forget folds forget_1..forget_4."""
    rng = np.random.default_rng(seed)

    def texts(n: int, words: int = 40) -> list[dict]:
        return [{"text": phrase(rng, words)} for _ in range(n)]

    def qa(n: int) -> list[dict]:
        return [{"question": phrase(rng, 4), "answer": phrase(rng, 3)} for _ in range(n)]

    forget = texts(6)
    configs = {
        "raw": {"forget": forget, "retain1": texts(8), "retain2": texts(8), "holdout": texts(6)},
        "verbmem": {"forget": [{"prompt": phrase(rng, 8), "gt": phrase(rng, 8)} for _ in range(4)]},
        "knowmem": {"forget_qa": qa(4), "forget_qa_icl": qa(2), "retain_qa": qa(4), "retain_qa_icl": qa(2)},
        "privleak": {"forget": forget[:4], "retain": texts(4), "holdout": texts(4)},
        "scal": {f"forget_{k}": forget + texts(2 * (k - 1)) for k in range(1, 5)},
        "sust": {f"forget_{k}": forget if k == 1 else texts(6) for k in range(1, 5)},
    }
    return write_hf_dataset(root, configs)


def multiple_choice(rng: np.random.Generator, n: int, subject: str | None = None) -> list[dict]:
    """WMDP/MMLU records: question, four choices, the answer's index (and MMLU's subject)."""
    rows = []
    for _ in range(n):
        row = {
            "question": phrase(rng, 5),
            "choices": [phrase(rng, 2) for _ in range(4)],
            "answer": int(rng.integers(4)),
        }
        rows.append({**row, "subject": subject} if subject else row)
    return rows


def write_wmdp(root: Path, seed: int = 0) -> dict[str, Path]:
    """WMDP's data sets: the questions (``cais/wmdp``: wmdp-bio, wmdp-chem, wmdp-cyber), the forget corpus
    (``cais/wmdp-corpora``: cyber-forget-corpus), Wikitext (``wikitext``: wikitext-2-raw-v1) and MMLU
    (``cais/mmlu``: all, of the subjects anatomy (stem) and philosophy (humanities), and the subject anatomy, with
    test and dev splits)."""
    rng = np.random.default_rng(seed)
    mmlu = multiple_choice(rng, 6, "anatomy")
    bio, cyber = multiple_choice(rng, 8), multiple_choice(rng, 8)
    corpus, wikitext = [{"text": phrase(rng, 50)} for _ in range(6)], [{"text": phrase(rng, 50)} for _ in range(8)]
    # Drawn last, so the sets drawn before them stay as they were.
    chem, philosophy = multiple_choice(rng, 5), multiple_choice(rng, 4, "philosophy")
    return {
        "wmdp": write_hf_dataset(
            root / "wmdp",
            {"wmdp-bio": {"test": bio}, "wmdp-chem": {"test": chem}, "wmdp-cyber": {"test": cyber}},
        ),
        "corpora": write_hf_dataset(root / "wmdp-corpora", {"cyber-forget-corpus": {"train": corpus}}),
        "wikitext": write_hf_dataset(root / "wikitext", {"wikitext-2-raw-v1": {"test": wikitext}}),
        "mmlu": write_hf_dataset(
            root / "mmlu",
            {"all": {"test": mmlu + philosophy, "dev": mmlu[:2]}, "anatomy": {"test": mmlu, "dev": mmlu[:2]}},
        ),
    }
