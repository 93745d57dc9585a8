"""Multiple-choice log-likelihood tasks, scored as lm-evaluation-harness scores them.

An item is a context, a list of choices (continuations) and the gold index. Each choice is scored by the sum
of the log-probabilities of its tokens after the context; ``acc`` picks the highest sum, ``acc_norm`` the
highest sum divided by the choice's length in characters (lm-evaluation-harness's definitions). Tokenisation
follows its HF model (lm-eval 0.4.13, :func:`tok_encode`): the tokenizer's own special tokens (BOS for Llama and
Mistral; none for GPT-2-style tokenizers) unless ``add_bos_token`` says otherwise, trailing context whitespace moved
into the continuation, the continuation's tokens taken from the tokenised concatenation.

A task is named by a spec ``FORMAT:PATH[:CONFIG[:SPLIT]]`` where ``PATH`` is a local ``.jsonl``/``.json`` file,
a Hub dataset id or a local directory laid out like one (``CONFIG`` and ``SPLIT``, default ``test``, select from
it), and ``FORMAT`` maps its columns to items:

* ``generic``: ``context`` (str), ``choices`` (list of str), ``gold`` (int);
* ``arc``: AI2 ARC (``question``, ``choices.text``, ``choices.label``, ``answerKey``), prompted as lm-eval does;
* ``mmlu``: ``question``, ``choices`` (4), ``answer`` (int) and, in ``cais/mmlu``, ``subject``, prompted as
  lm-eval's zero-shot MMLU subject tasks (``The following are multiple choice questions (with answers) about
  <subject>.``, the lettered choices, ``Answer:``, choices `` A`` to `` D``);
* ``wmdp``: WMDP (``cais/wmdp``, configurations ``wmdp-bio``/``-chem``/``-cyber``; the same columns), prompted as
  lm-eval's ``wmdp_bio``/``_chem``/``_cyber`` (the same layout about biology, chemistry or cybersecurity).

Group scores are lm-eval's too (:func:`weighted_mean`, its ``aggregate_subtask_metrics`` with ``weight_by_size``):
``wmdp`` over bio, chem and cyber (``tasks/wmdp/_wmdp.yaml``) and MMLU's four categories over their subjects
(``tasks/mmlu/default/_mmlu_*.yaml``). MMLU's own number, weighted by size over the categories and so over all 57
subjects, is the accuracy over all its items, which is what the ``all`` configuration scores.

Everything lm-evaluation-harness offers (with network) is available through
:mod:`jaxunlearn.evaluation.lm_eval_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxunlearn.data.source import DataError


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int
    subject: str = ""  # MMLU's subject (cais/mmlu's ``subject`` column): the sub-task lm-eval scores it in


def _generic(row: dict, config: str) -> Item:
    return Item(row["context"], tuple(row["choices"]), int(row["gold"]))


def _arc(row: dict, config: str) -> Item:
    labels = list(row["choices"]["label"])
    return Item(
        f"Question: {row['question']}\nAnswer:",
        tuple(" " + t for t in row["choices"]["text"]),
        labels.index(row["answerKey"]),
    )


def _lettered(row: dict, description: str) -> Item:
    """lm-evaluation-harness's MMLU/WMDP prompt: the task description, the question, the lettered choices and
    ``Answer:``, each choice scored as `` A``, `` B``, ..."""
    letters = "ABCD"
    lines = [row["question"].strip()] + [f"{letters[i]}. {c}" for i, c in enumerate(row["choices"])]
    context = description + "\n".join(lines) + "\nAnswer:"
    return Item(context, tuple(f" {letters[i]}" for i in range(len(row["choices"]))), int(row["answer"]))


def _about(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""


def _mmlu(row: dict, config: str) -> Item:
    # lm-eval's per-subject tasks describe the subject (cais/mmlu rows name it: high_school_biology, ...)
    subject = row.get("subject") or ("" if config in ("", "all", "auxiliary_train") else config)
    return dataclasses.replace(_lettered(row, _about(subject.replace("_", " "))), subject=subject)


# WMDP's configurations and the subject lm-eval's wmdp_bio/_chem/_cyber tasks describe.
WMDP_SUBJECTS = {"wmdp-bio": "biology", "wmdp-chem": "chemistry", "wmdp-cyber": "cybersecurity"}


def _wmdp(row: dict, config: str) -> Item:
    """WMDP (cais/wmdp; question, choices, answer), prompted as lm-eval's wmdp tasks: the subject from the
    configuration (wmdp-bio, -chem, -cyber; none for another name)."""
    return _lettered(row, _about(WMDP_SUBJECTS.get(config, "")))


FORMATS: dict[str, Callable[[dict, str], Item]] = {"generic": _generic, "arc": _arc, "mmlu": _mmlu, "wmdp": _wmdp}


def load_task(spec: str, max_items: int = 0) -> tuple[str, list[Item]]:
    """``(name, items)`` for a ``FORMAT:PATH[:CONFIG[:SPLIT]]`` spec."""
    fmt, _, rest = spec.partition(":")
    if fmt not in FORMATS or not rest:
        raise DataError(f"task {spec!r}: expected FORMAT:PATH[:CONFIG[:SPLIT]] with FORMAT in {sorted(FORMATS)}")
    parts = rest.split(":")
    path = Path(parts[0]).expanduser()
    config = parts[1] if len(parts) > 1 else ""
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" else json.loads(text)
        name = path.stem
    else:
        import datasets

        try:
            rows = list(  # a Hub id, or a local directory laid out like the Hub data set
                datasets.load_dataset(
                    str(path) if path.is_dir() else parts[0],
                    config or None,
                    split=parts[2] if len(parts) > 2 else "test",
                )
            )
        except Exception as e:
            raise DataError(f"task {spec!r}: cannot load {parts[0]} ({type(e).__name__}: {e})") from e
        name = (path.name if path.is_dir() else parts[0]).replace("/", "_") + (f":{config}" if config else "")
    try:
        items = [FORMATS[fmt](row, config) for row in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"task {spec!r}: a record does not have the {fmt!r} fields ({type(e).__name__}: {e})") from e
    if max_items:
        items = items[:max_items]
    if not items:
        raise DataError(f"task {spec!r} has no items")
    return name, items


def prefix_token_id(tokenizer: Any) -> int:
    """The token an empty context is scored after: BOS, else EOS (lm-eval's ``HFLM.prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(
    tokenizer: Any, string: str, add_special_tokens: bool | None = None, add_bos_token: bool | None = None
) -> list[int]:
    """``string``'s token ids as lm-eval 0.4.13's ``HFLM.tok_encode`` makes them: ``add_special_tokens`` if given,
    else ``add_bos_token`` if given, else the tokenizer's default (since lm-eval 0.4.10: BOS for Llama and Mistral
    tokenizers); none when the string already starts with the prefix token's text."""
    kwargs = {"add_special_tokens": add_special_tokens} if add_special_tokens is not None else {}
    if add_special_tokens is None and add_bos_token is not None:
        kwargs["add_special_tokens"] = add_bos_token
    if add_special_tokens is None and string.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        kwargs["add_special_tokens"] = False
    ids = list(tokenizer.encode(string, **kwargs))
    bos = tokenizer.bos_token_id
    if add_bos_token and kwargs.get("add_special_tokens", True) and bos is not None and ids[:1] != [bos]:
        # lm-eval also loads the tokenizer with add_bos_token=True (HFLM._create_tokenizer), which makes a
        # transformers 5 tokenizer put BOS first even where its saved template has none (GPT-2 style)
        ids = [bos] + ids
    return ids


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_bos_token: bool | None = None
) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness's HF model splits them (lm-eval 0.4.13
    ``TemplateLM.loglikelihood`` and ``_encode_pair`` with :func:`tok_encode`): the context carries the tokenizer's
    BOS where :func:`tok_encode` adds one; an empty context is the prefix token."""
    if not context:
        ids = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], ids) if ids[0] != prefix else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tok_encode(tokenizer, context + continuation, add_bos_token=add_bos_token)
    context_ids = tok_encode(tokenizer, context, add_bos_token=add_bos_token)
    return whole[: len(context_ids)], whole[len(context_ids) :]


def choose(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """``(argmax of the sums, argmax of the sums per character)``: the ``acc`` and ``acc_norm`` predictions."""
    lls = np.asarray(loglikelihoods, np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def score_task(
    score_pairs: Callable[[list[tuple[list[int], list[int]]]], list[tuple[float, bool]]],
    tokenizer: Any,
    items: Sequence[Item],
    add_bos_token: bool | None = None,
) -> dict[str, Any]:
    """Accuracy and length-normalised accuracy of ``items``; ``score_pairs`` scores token pairs. Items of more than
    one subject (MMLU's ``all``) also give ``subjects``: each subject's ``{acc, acc_norm, n}``, lm-eval's sub-tasks."""
    pairs, owners = [], []
    for i, item in enumerate(items):
        for choice in item.choices:
            pairs.append(encode_pair(tokenizer, item.context, choice, add_bos_token))
            owners.append(i)
    scores = score_pairs(pairs)
    acc, acc_norm, cursor = [], [], 0
    for item in items:
        lls = [s for s, _ in scores[cursor : cursor + len(item.choices)]]
        cursor += len(item.choices)
        pred, pred_norm = choose(lls, item.choices)
        acc.append(pred == item.gold)
        acc_norm.append(pred_norm == item.gold)
    result: dict[str, Any] = {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(items)}
    subjects = sorted({item.subject for item in items})
    if len(subjects) > 1:
        by, hits, hits_norm = np.asarray([item.subject for item in items]), np.asarray(acc), np.asarray(acc_norm)
        result["subjects"] = {
            s: {
                "acc": float(hits[by == s].mean()),
                "acc_norm": float(hits_norm[by == s].mean()),
                "n": int((by == s).sum()),
            }
            for s in subjects
        }
    return result


# --- lm-eval's group scores -----------------------------------------------------------------------------------


def weighted_mean(values: Sequence[float], sizes: Sequence[int], weight_by_size: bool = True) -> float:
    """A group's score from its sub-tasks' scores: lm-eval's ``aggregate_subtask_metrics`` (``api/metrics.py``), the
    mean weighted by each sub-task's number of items (``weight_by_size``), else the plain mean."""
    if len(values) != len(sizes):
        raise ValueError(f"{len(values)} values but {len(sizes)} sizes")
    weights = [float(n) if weight_by_size else 1.0 for n in sizes]
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


# lm-eval's ``wmdp`` group (tasks/wmdp/_wmdp.yaml): acc weighted by size over these three configurations.
WMDP_GROUP = ("wmdp-bio", "wmdp-chem", "wmdp-cyber")

# MMLU's subjects and the category group lm-eval scores each in (tasks/mmlu/_generate_configs.py SUBJECTS; the
# groups mmlu_stem, _other, _social_sciences, _humanities each weight their subjects by size, tasks/mmlu/default/).
MMLU_CATEGORIES = {
    **dict.fromkeys(
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning".split(),
        "stem",
    ),
    **dict.fromkeys(
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology".split(),
        "other",
    ),
    **dict.fromkeys(
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy".split(),
        "social_sciences",
    ),
    **dict.fromkeys(
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions".split(),
        "humanities",
    ),
}


def mmlu_categories(subjects: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """lm-eval's MMLU category groups (``mmlu_stem``, ``mmlu_other``, ``mmlu_social_sciences``, ``mmlu_humanities``)
    from per-subject results ``{subject: {acc, n}}``: each the size-weighted mean of its subjects' ``acc``.
    Subjects outside MMLU's 57 are left out."""
    out = {}
    for category in ("stem", "other", "social_sciences", "humanities"):
        members = [r for s, r in subjects.items() if MMLU_CATEGORIES.get(s) == category]
        if members:
            acc = weighted_mean([r["acc"] for r in members], [r["n"] for r in members])
            out[f"mmlu_{category}"] = {"acc": acc, "n": sum(r["n"] for r in members)}
    return out
