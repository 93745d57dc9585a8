"""Question-answer data (TOFU and MUSE's QA): the prompt is context only, everywhere.

Training losses are checked against torch with TOFU's labels (the prompt's label positions at -100, the loss a
per-sequence mean over the rest), the chunk layout against the tokenizer called directly, and the evaluation
loop's statistics against a hand-made mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxunlearn.data import qa
from jaxunlearn.data.arrays import Chunks
from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import get_method
from jaxunlearn.models import losses
from tests.tiny_models import current_and_reference, make_tokenizer, padded_batch

VARIANT = "llama_mha_untied"
PROMPTS = np.asarray([4, 0, 2], np.int32)  # a question of 4 tokens, plain text, a question of 2 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return current_and_reference(tmp_path_factory.mktemp("qa"), VARIANT)


def _split(seed):
    tokens, mask = padded_batch(seed=seed, batch=3, length=12)
    return {"tokens": tokens, "mask": mask, "chunk_id": np.arange(3, dtype=np.int32), "prompt_length": PROMPTS}


BATCH = {"forget": _split(0), "retain": _split(1)}


def tofu_labels(split) -> torch.Tensor:
    """TOFU's labels: the input ids with the question's positions and padding at -100."""
    labels = torch.from_numpy(split["tokens"]).long().clone()
    mask = torch.from_numpy(split["mask"]).bool()
    for row, n in enumerate(split["prompt_length"]):
        labels[row, :n] = -100
    labels[~mask] = -100
    return labels


def torch_seq_nll(model, split) -> torch.Tensor:
    """Per-sequence mean cross-entropy of the shifted labels (ignore_index -100), as TOFU's get_batch_loss."""
    logits = model(
        input_ids=torch.from_numpy(split["tokens"]), attention_mask=torch.from_numpy(split["mask"])
    ).logits.float()
    labels = tofu_labels(split)[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    return loss.sum(1) / (labels != -100).sum(1)


def _value(name, lm, params, ref_params, hparams=None):
    method = get_method(name)
    ctx = Context(lm, hparams={**method.hparams, **(hparams or {})}, seed=5, chunk_size=5)
    batch = jax.tree.map(jnp.asarray, BATCH)
    value, metrics = jax.jit(lambda p: method.loss(p, ref_params, batch, jax.random.key(0), ctx))(params)
    return float(value), jax.tree.map(float, metrics)


def test_targets_skip_the_prompt():
    tokens, mask = padded_batch(seed=0, batch=3, length=12)
    _, target_mask = losses.next_token_targets(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(PROMPTS))
    expected = np.zeros((3, 12), bool)
    lengths = mask.sum(1)
    for row in range(3):
        for t in range(11):  # position t scores token t + 1: a real token outside the prompt
            expected[row, t] = t + 1 < lengths[row] and t + 1 >= PROMPTS[row]
    np.testing.assert_array_equal(np.asarray(target_mask), expected)
    chunks = Chunks(tokens.astype(np.int32), lengths.astype(np.int32), np.arange(3, dtype=np.int32), 3, PROMPTS)
    np.testing.assert_array_equal(chunks.target_mask(), expected)  # the host's copy of the rule


def test_gradient_descent_terms_count_the_answer_only(models):
    lm, params, ref_params, current, _ = models
    value, metrics = _value("ga_gd", lm, params, ref_params, {"forget_weight": 0.5, "retain_weight": 2.0})
    with torch.no_grad():
        forget, retain = torch_seq_nll(current, BATCH["forget"]), torch_seq_nll(current, BATCH["retain"])
    expected = -0.5 * forget.mean() + 2.0 * retain.mean()
    assert abs(value - expected.item()) < 1e-5
    assert abs(metrics["forget_nll"] - forget.mean().item()) < 1e-5


def test_kl_term_averages_the_positions_that_predict_the_answer(models):
    lm, params, ref_params, current, reference = models
    value, metrics = _value("ga_kl", lm, params, ref_params, {"forget_weight": 1.0, "retain_weight": 1.0})
    split = BATCH["retain"]
    with torch.no_grad():
        inputs = dict(input_ids=torch.from_numpy(split["tokens"]), attention_mask=torch.from_numpy(split["mask"]))
        ref_logp = torch.log_softmax(reference(**inputs).logits.float(), -1)
        logp = torch.log_softmax(current(**inputs).logits.float(), -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        # position t predicts label t + 1; the last real position (no label after it) is kept, as for text
        positions = torch.from_numpy(split["mask"]).bool().clone()
        for row, n in enumerate(split["prompt_length"]):
            positions[row, : max(n - 1, 0)] = False
        kl = (kl * positions).sum(1) / positions.sum(1)
        forget = torch_seq_nll(current, BATCH["forget"])
    assert abs(metrics["retain_kl"] - kl.mean().item()) < 1e-5
    assert abs(value - (-forget.mean() + kl.mean()).item()) < 1e-5


def test_npo_sums_the_answer_log_likelihood(models):
    lm, params, ref_params, current, reference = models
    value, _ = _value("npo", lm, params, ref_params, {"beta": 0.5})
    split = BATCH["forget"]
    with torch.no_grad():
        n = (tofu_labels(split)[:, 1:] != -100).sum(1)
        logp, ref = -torch_seq_nll(current, split) * n, -torch_seq_nll(reference, split) * n
        expected = (-(2 / 0.5) * torch.nn.functional.logsigmoid(-0.5 * (logp - ref))).mean()
    assert abs(value - expected.item()) < 1e-5


def test_template_puts_the_whitespace_with_the_answer():
    prompt, answer = qa.render("Question: {question}\nAnswer: {answer}", "Who?", "Basil")
    assert (prompt, answer) == ("Question: Who?\nAnswer:", " Basil")
    assert qa.render("[INST] {question} [/INST]{answer}", "q", "a") == ("[INST] q [/INST]", "a")
    for bad in ("Q: {question}", "{answer} then {question}", "{question} {answer} {answer}"):
        with pytest.raises(ValueError, match="config.data.qa_template"):
            qa.check_template(bad)


def test_a_literal_template_keeps_the_whitespace_in_the_prompt():
    # open-unlearning's prompt is user_start_tag + question + user_end_tag + asst_start_tag, trailing space included
    # (src/data/utils.py preprocess_chat_instance); the full text is that prompt + the answer.
    template = "literal:Question: {question}\nAnswer: {answer}"
    assert qa.render(template, "Who?", "Basil") == ("Question: Who?\nAnswer: ", "Basil")
    for good in (template, "auto", "chat", "chat:You are a helpful assistant."):
        qa.check_template(good)
    for bad in ("literal:Q: {question}", "literal:{answer} {question}"):
        with pytest.raises(ValueError, match="config.data.qa_template"):
            qa.check_template(bad)
    with pytest.raises(ValueError, match="resolved first"):
        qa.question_answer_ids(make_tokenizer(), "auto", "q", "a")


def test_question_answer_chunks_hold_prompt_then_answer_then_eos():
    tok = make_tokenizer()
    pairs = [("the quick fox", "jumps over the lazy dog"), ("machine unlearning", "removes documents")]
    template = "the {question} models {answer}"
    chunks = qa.tokenize_question_answers(pairs, tok, 32, template)
    for row, (q, a) in enumerate(pairs):
        full = tok(f"the {q} models {a}")["input_ids"] + [tok.eos_token_id]
        prompt = tok(f"the {q} models")["input_ids"]
        assert chunks.tokens[row, : chunks.lengths[row]].tolist() == full
        assert chunks.prompts[row] == len(prompt) and full[: len(prompt)] == prompt
    # 5 tokens: the first prompt fills them (nothing to score: dropped), the second keeps part of its answer
    prompts = [len(tok(f"the {q} models")["input_ids"]) for q, _ in pairs]
    assert prompts[0] >= 5 > prompts[1]
    short = qa.tokenize_question_answers(pairs, tok, 5, template)
    assert short.tokens.shape == (1, 5) and short.doc_index.tolist() == [1] and short.num_documents == 2
    assert short.tokens[0].tolist() == chunks.tokens[1, :5].tolist() and short.prompts[0] == prompts[1]
