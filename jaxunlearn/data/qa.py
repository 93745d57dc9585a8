"""Question-answer data (TOFU, MUSE's knowledge QA): the prompt template and the token layout shared by training
and evaluation.

A question-answer pair becomes one chunk: the tokens of ``prompt + answer`` (plus the tokenizer's EOS, as TOFU and
open-unlearning append it), with the prompt's length recorded so that losses and statistics count the answer's
tokens only. The template is ``chat`` (the tokenizer's chat template, optionally ``chat:SYSTEM PROMPT``) or one
string with a ``{question}`` field that ends with ``{answer}``, e.g.
``"Question: {question}\\nAnswer: {answer}"``: the prompt is everything before ``{answer}`` without its trailing
whitespace, which goes with the answer instead (``"Answer:"`` + ``" Paris"``), so that a BPE tokenizer does not
split the answer's first word differently in the prompt than in the whole text. A template that starts with
``literal:`` keeps that whitespace in the prompt instead, as open-unlearning's ``preprocess_chat_instance`` and TOFU
join their tags (``Answer: `` is the prompt's end). ``auto`` stands for the TOFU format of the run's model,
resolved by :func:`template_for_model` before any text is tokenised.
"""

from __future__ import annotations

import logging
import re
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
LITERAL = "literal:"
AUTO = "auto"

# TOFU's prompt format per model, as open-unlearning's configs/model/*.yaml (template_args) and TOFU's
# config/model_config.yaml lay it out. Tags become literal templates: open-unlearning tokenises the prompt
# (user_start_tag + question + user_end_tag + asst_start_tag) with its trailing whitespace.
CHAT_SYSTEM = CHAT + ":You are a helpful assistant."  # Llama 3.x Instruct, Qwen2.5, Phi-3.5-mini, zephyr
LLAMA2_CHAT = LITERAL + "[INST] {question} [/INST]{answer}"  # Llama-2-7b-chat (TOFU's llama2-7b): no system prompt
QUESTION_ANSWER = LITERAL + "Question: {question}\nAnswer: {answer}"  # phi-1_5, Llama-2-7b/13b-hf, pythia, stablelm
# model_type -> (a marker of its chat template, the format) for tokenizers with a chat template.
CHAT_FORMATS: dict[str, tuple[tuple[str, str], ...]] = {
    # ChatML on a Llama body (SmolLM2): as open-unlearning lays out Qwen2.5's ChatML
    "llama": (("<|start_header_id|>", CHAT_SYSTEM), ("[INST]", LLAMA2_CHAT), ("<|im_start|>", CHAT_SYSTEM)),
    "qwen2": (("<|im_start|>", CHAT_SYSTEM),),
    "phi3": (("<|assistant|>", CHAT_SYSTEM),),
    "mistral": (("<|assistant|>", CHAT_SYSTEM),),  # zephyr-7b-beta
    "gemma": (("<start_of_turn>", CHAT),),  # gemma-7b-it: no system prompt (its template refuses one)
}
# model_type -> the format, for tokenizers without a chat template (Llama is told apart by its name, below).
PLAIN_FORMATS = {"phi": QUESTION_ANSWER, "gpt_neox": QUESTION_ANSWER, "stablelm": QUESTION_ANSWER}


FIELD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")  # a template field, {question}; other braces are text


def is_chat(template: str) -> bool:
    return template == CHAT or template.startswith(CHAT + ":")


def _name_key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def template_for_model(
    model_type: str, tokenizer: Any, names: Sequence[str] = (), where: str = "config.evaluation.tofu.template"
) -> str:
    """The TOFU prompt format of a model, as open-unlearning's ``configs/model/*.yaml`` choose it.

    With a chat template, the model's ``model_type`` and a marker of that template pick the format (Llama 3's
    ``<|start_header_id|>`` or Llama 2's ``[INST]``, Qwen's (and SmolLM2's) ChatML ``<|im_start|>``, Phi-3's and zephyr's
    ``<|assistant|>``, Gemma's ``<start_of_turn>``). Without one, ``phi``, ``gpt_neox`` and ``stablelm`` use
    ``Question: ...\\nAnswer: ...``; a ``llama`` model is told apart by ``names`` (its path, its tokenizer's or its
    config's name): "llama2" with "chat" (or TOFU's ``tofu_ft_llama2``) is Llama-2-chat's ``[INST]`` format,
    other "llama2" names the base models' ``Question:/Answer:``. Anything else is a one-line ValueError naming
    ``where``, the setting to give instead.
    """
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(chat_template, Mapping):  # named templates: the default one
        chat_template = chat_template.get("default", "")
    if chat_template:
        for marker, template in CHAT_FORMATS.get(model_type, ()):
            if marker in chat_template:
                return template
    elif model_type in PLAIN_FORMATS:
        return PLAIN_FORMATS[model_type]
    elif model_type == "llama":
        keys = [_name_key(n) for n in names if n]
        if any("llama2" in k and ("chat" in k or "tofuft" in k) for k in keys):
            return LLAMA2_CHAT
        if any("llama2" in k for k in keys):
            return QUESTION_ANSWER
    described = "a chat template" if chat_template else "no chat template"
    named = ", ".join(repr(n) for n in names if n) or "no name"
    raise ValueError(
        f"{where}='auto': no TOFU prompt format is known for this model (model_type {model_type!r}, {described}, "
        f"{named}); set {where} to its template, e.g. {CHAT_SYSTEM!r}, {LLAMA2_CHAT!r} or {QUESTION_ANSWER!r}"
    )


def check_template(template: str, where: str = "config.data.qa_template") -> None:
    """A template has one ``{question}`` and ends with ``{answer}`` (optionally after ``literal:``), or is
    ``chat[:SYSTEM PROMPT]`` or ``auto``; ValueError naming ``where`` otherwise."""
    if is_chat(template) or template == AUTO:
        return
    template = template.removeprefix(LITERAL)
    problems = []
    if template.count("{question}") != 1:
        problems.append("one {question} field")
    if not template.endswith("{answer}") or template.count("{answer}") != 1:
        problems.append("one {answer} field at its very end")
    unknown = sorted(set(FIELD.findall(template)) - {"{question}", "{answer}"})
    if unknown:  # it would stay in every prompt as literal text
        problems.append(f"no other field ({', '.join(unknown)}: only {{question}} and {{answer}} are filled in)")
    if problems:
        raise ValueError(f"{where}={template!r}: a question-answer template needs " + " and ".join(problems))


def render(template: str, question: str, answer: str) -> tuple[str, str]:
    """``(prompt, answer_text)``: the template's text before ``{answer}`` without trailing whitespace, and that
    whitespace followed by the answer (``prompt + answer_text`` is the whole filled template); with ``literal:``
    the text before ``{answer}`` as it is, and the answer."""
    if template.startswith(LITERAL):
        return template[len(LITERAL) : -len("{answer}")].replace("{question}", question), answer
    head = template[: -len("{answer}")].replace("{question}", question)
    prompt = head.rstrip()
    return prompt, head[len(prompt) :] + answer


def _chat_ids(
    tokenizer: Any, template: str, question: str, answer: str | None, where: str = "config.data.qa_template"
) -> list[int]:
    system = template[len(CHAT) + 1 :] if template.startswith(CHAT + ":") else ""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}={template!r}: the tokenizer has no chat template; give a text template, e.g. {DEFAULT_TEMPLATE!r}"
        )
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=answer is None, date_string=CHAT_DATE, return_dict=False
    )
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def question_answer_ids(
    tokenizer: Any,
    template: str,
    question: str,
    answer: str,
    *,
    add_special_tokens: bool = True,
    eos: bool = True,
    where: str = "config.data.qa_template",
) -> tuple[list[int], int]:
    """``(ids, prompt_length)``: the tokens of the filled template (with the tokenizer's special tokens when
    ``add_special_tokens``, and its EOS appended when ``eos`` and not already last), and how many of them the
    prompt alone takes. ``answer=""`` with ``eos=False`` gives the prompt alone (for generation)."""
    if template == AUTO:
        raise ValueError("the question-answer template 'auto' must be resolved first (qa.template_for_model)")
    if is_chat(template):
        prompt_ids = _chat_ids(tokenizer, template, question, None, where)
        ids = _chat_ids(tokenizer, template, question, answer, where) if answer or eos else list(prompt_ids)
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
