"""KV-cached greedy generation against uncached argmax decoding and transformers' greedy generate."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxunlearn import sharding
from jaxunlearn.generation import generate
from jaxunlearn.hf_checkpoint import from_pretrained
from jaxunlearn.models import split_model
from tests.tiny_models import save_hf_model


@pytest.fixture(scope="module", params=["llama_gqa_tied", "mistral_sliding_window", "qwen2_mixed_windows"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / request.param
    hf = save_hf_model(request.param, path)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours does
    lm, params = split_model(from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32"))
    return hf, lm, params, path


PROMPTS = np.random.default_rng(0).integers(3, 96, (3, 6))


def test_cached_greedy_equals_uncached_argmax_and_transformers(model):
    hf, lm, params, _ = model
    ours = generate(lm, params, PROMPTS, max_new_tokens=10, batch_size=2)  # two batches, the last padded
    seq = PROMPTS.copy()
    for _ in range(10):  # no cache: re-run the whole sequence every step
        logits = np.asarray(lm.logits(params, jnp.asarray(seq)))
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(ours, seq[:, 6:])
    with torch.no_grad():
        ref = hf.generate(
            torch.from_numpy(PROMPTS),
            attention_mask=torch.ones(PROMPTS.shape, dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(ours, ref[:, 6:].numpy())


def test_left_padded_prompts_decode_as_if_alone(model):
    _, lm, params, _ = model
    short = PROMPTS[1, 2:]
    padded = np.concatenate([[0, 0], short])[None]
    out = generate(lm, params, padded, np.array([[0, 0, 1, 1, 1, 1]]), max_new_tokens=8)
    alone = generate(lm, params, short[None], max_new_tokens=8)
    np.testing.assert_array_equal(out, alone)


def test_sharded_generation_equals_one_device(model):
    _, lm, params, path = model
    ref = generate(lm, params, PROMPTS, max_new_tokens=6)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    s_lm, s_params = split_model(from_pretrained(path, mesh=mesh, dtype="float32"))
    np.testing.assert_array_equal(generate(s_lm, s_params, PROMPTS, max_new_tokens=6, mesh=mesh), ref)
