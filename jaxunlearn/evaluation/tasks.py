"""Multiple-choice log-likelihood tasks, scored as lm-evaluation-harness scores them.

An item is a context, a list of choices (continuations) and the gold index. Each choice is scored by the sum
of the log-probabilities of its tokens after the context; ``acc`` picks the highest sum, ``acc_norm`` the
highest sum divided by the choice's length in characters (lm-evaluation-harness's definitions). Tokenisation
follows its HF model too: no special tokens, trailing context whitespace moved into the continuation, the
continuation's tokens taken from the tokenised concatenation.

A task is named by a spec ``FORMAT:PATH[:CONFIG[:SPLIT]]`` where ``PATH`` is a local ``.jsonl``/``.json`` file
or a Hub dataset id, and ``FORMAT`` maps its columns to items:

* ``generic``: ``context`` (str), ``choices`` (list of str), ``gold`` (int);
* ``arc``: AI2 ARC (``question``, ``choices.text``, ``choices.label``, ``answerKey``), prompted as lm-eval does;
* ``mmlu``: ``question``, ``choices`` (4), ``answer`` (int), prompted as lm-eval's zero-shot MMLU.

Everything lm-evaluation-harness offers (with network) is available through
:mod:`jaxunlearn.evaluation.lm_eval_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxunlearn.data.documents import DataError


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int


def _generic(row: dict) -> Item:
    return Item(row["context"], tuple(row["choices"]), int(row["gold"]))


def _arc(row: dict) -> Item:
    labels = list(row["choices"]["label"])
    return Item(
        f"Question: {row['question']}\nAnswer:",
        tuple(" " + t for t in row["choices"]["text"]),
        labels.index(row["answerKey"]),
    )


def _mmlu(row: dict) -> Item:
    letters = "ABCD"
    lines = [row["question"].strip()] + [f"{letters[i]}. {c}" for i, c in enumerate(row["choices"])]
    return Item(
        "\n".join(lines) + "\nAnswer:", tuple(f" {letters[i]}" for i in range(len(row["choices"]))), int(row["answer"])
    )


FORMATS: dict[str, Callable[[dict], Item]] = {"generic": _generic, "arc": _arc, "mmlu": _mmlu}


def load_task(spec: str, max_items: int = 0) -> tuple[str, list[Item]]:
    """``(name, items)`` for a ``FORMAT:PATH[:CONFIG[:SPLIT]]`` spec."""
    fmt, _, rest = spec.partition(":")
    if fmt not in FORMATS or not rest:
        raise DataError(f"task {spec!r}: expected FORMAT:PATH[:CONFIG[:SPLIT]] with FORMAT in {sorted(FORMATS)}")
    parts = rest.split(":")
    path = Path(parts[0]).expanduser()
    if path.exists():
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" else json.loads(text)
        name = path.stem
    else:
        import datasets

        try:
            rows = list(
                datasets.load_dataset(
                    parts[0],
                    parts[1] if len(parts) > 1 and parts[1] else None,
                    split=parts[2] if len(parts) > 2 else "test",
                )
            )
        except Exception as e:
            raise DataError(f"task {spec!r}: cannot load {parts[0]} ({type(e).__name__}: {e})") from e
        name = ":".join(parts[:2]).replace("/", "_")
    try:
        items = [FORMATS[fmt](row) for row in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"task {spec!r}: a record does not have the {fmt!r} fields ({type(e).__name__}: {e})") from e
    if max_items:
        items = items[:max_items]
    if not items:
        raise DataError(f"task {spec!r} has no items")
    return name, items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness's HF model splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
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
) -> dict[str, float]:
    """Accuracy and length-normalised accuracy of ``items``; ``score_pairs`` scores token pairs."""
    pairs, owners = [], []
    for i, item in enumerate(items):
        for choice in item.choices:
            pairs.append(encode_pair(tokenizer, item.context, choice))
            owners.append(i)
    scores = score_pairs(pairs)
    acc, acc_norm, cursor = [], [], 0
    for item in items:
        lls = [s for s, _ in scores[cursor : cursor + len(item.choices)]]
        cursor += len(item.choices)
        pred, pred_norm = choose(lls, item.choices)
        acc.append(pred == item.gold)
        acc_norm.append(pred_norm == item.gold)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(items)}
