"""Question-answer data (TOFU, MUSE's knowledge QA): the prompt template and the token layout shared by training
and evaluation.

A question-answer pair becomes one chunk: the tokens of ``prompt + answer`` (plus the tokenizer's EOS, as TOFU and
open-unlearning append it), with the prompt's length recorded so that losses and statistics count the answer's
tokens only. The template is ``chat`` (the tokenizer's chat template, optionally ``chat:SYSTEM PROMPT``) or one
string with a ``{question}`` field that ends with ``{answer}``, e.g.
``"Question: {question}\\nAnswer: {answer}"``: the prompt is everything before ``{answer}`` without its trailing
whitespace, which goes with the answer instead (``"Answer:"`` + ``" Paris"``), so that a BPE tokenizer does not
split the answer's first word differently in the prompt than in the whole text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxunlearn.data.arrays import Chunks
from jaxunlearn.data.source import DataError

log = logging.getLogger(__name__)
DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"
# ``chat`` or ``chat:SYSTEM PROMPT``: the tokenizer's own chat template (a user turn with the question, an assistant
# turn with the answer), as open-unlearning lays out its instruct models' data; the date is fixed to open-unlearning's
# (Llama 3 templates print today's date otherwise).
CHAT = "chat"
CHAT_DATE = "10 Apr 2025"


def is_chat(template: str) -> bool:
    return template == CHAT or template.startswith(CHAT + ":")


def check_template(template: str, where: str = "config.data.qa_template") -> None:
    """A template has one ``{question}`` and ends with ``{answer}`` (or is ``chat[:SYSTEM PROMPT]``); ValueError
    naming ``where`` otherwise."""
    if is_chat(template):
        return
    problems = []
    if template.count("{question}") != 1:
        problems.append("one {question} field")
    if not template.endswith("{answer}") or template.count("{answer}") != 1:
        problems.append("one {answer} field at its very end")
    if problems:
        raise ValueError(f"{where}={template!r}: a question-answer template needs " + " and ".join(problems))


def render(template: str, question: str, answer: str) -> tuple[str, str]:
    """``(prompt, answer_text)``: the template's text before ``{answer}`` without trailing whitespace, and that
    whitespace followed by the answer (``prompt + answer_text`` is the whole filled template)."""
    head = template[: -len("{answer}")].replace("{question}", question)
    prompt = head.rstrip()
    return prompt, head[len(prompt) :] + answer


def _chat_ids(tokenizer: Any, template: str, question: str, answer: str | None) -> list[int]:
    system = template[len(CHAT) + 1 :] if template.startswith(CHAT + ":") else ""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.qa_template={template!r}: the tokenizer has no chat template; give a text template")
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=answer is None, date_string=CHAT_DATE, return_dict=False
    )
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def question_answer_ids(
    tokenizer: Any, template: str, question: str, answer: str, *, add_special_tokens: bool = True, eos: bool = True
) -> tuple[list[int], int]:
    """``(ids, prompt_length)``: the tokens of the filled template (with the tokenizer's special tokens when
    ``add_special_tokens``, and its EOS appended when ``eos`` and not already last), and how many of them the
    prompt alone takes. ``answer=""`` with ``eos=False`` gives the prompt alone (for generation)."""
    if is_chat(template):
        prompt_ids = _chat_ids(tokenizer, template, question, None)
        ids = _chat_ids(tokenizer, template, question, answer) if answer or eos else list(prompt_ids)
    else:
        prompt, answer_text = render(template, question, answer)
        encode = lambda text: tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]  # noqa: E731
        prompt_ids, ids = encode(prompt), list(encode(prompt + answer_text))
    if eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(int(tokenizer.eos_token_id))
    return ids, min(len(prompt_ids), len(ids))


def tokenize_question_answers(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Any,
    max_length: int,
    template: str,
    *,
    add_special_tokens: bool = True,
    pad_id: int = 0,
    desc: str = "tokenising",
) -> Chunks:
    """One chunk per ``(question, answer)``, truncated to ``max_length`` tokens, with its prompt length. A pair
    whose prompt leaves no answer token within ``max_length`` is dropped (it has nothing to score). Each pair is
    its own document."""
    check_template(template)
    rows: list[tuple[list[int], int, int]] = []
    for i, (question, answer) in enumerate(tqdm(pairs, desc=desc, unit="pair", disable=None, leave=False)):
        ids, prompt_length = question_answer_ids(
            tokenizer, template, question, answer, add_special_tokens=add_special_tokens
        )
        ids = ids[:max_length]
        if prompt_length < len(ids):
            rows.append((ids, prompt_length, i))
    tokens = np.full((len(rows), max_length), pad_id, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    prompts = np.zeros(len(rows), np.int32)
    for r, (ids, prompt_length, _) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        lengths[r], prompts[r] = len(ids), prompt_length
    doc_index = np.asarray([i for *_, i in rows], np.int32)
    if len(rows) < len(pairs):
        dropped = len(pairs) - len(rows)
        if not rows:
            raise DataError(
                f"{desc}: no question leaves room for its answer within data.max_length={max_length} tokens"
            )
        log.warning(
            "%s: %d of %d pairs dropped, their prompt fills data.max_length=%d", desc, dropped, len(pairs), max_length
        )
    return Chunks(tokens, lengths, doc_index, len(pairs), prompts)
