"""KV-cached greedy generation against uncached argmax decoding and transformers' greedy generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxunlearn.models import ModelConfig, init_model, param_shardings, split_model
from jaxunlearn.models.generation import generate
from jaxunlearn.models.hf_checkpoint import from_pretrained
from jaxunlearn.parallel import sharding
from tests.tiny_models import save_hf_model


@pytest.fixture(
    scope="module", params=["llama_gqa_tied", "mistral_sliding_window", "qwen2_mixed_windows", "gpt_neox_pythia"]
)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / request.param
    hf = save_hf_model(request.param, path)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours does
    lm, params = split_model(from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32"))
    return hf, lm, params, path


PROMPTS = np.random.default_rng(0).integers(3, 96, (3, 6))


@pytest.mark.slow
def test_cached_greedy_equals_uncached_argmax_and_transformers(model):
    hf, lm, params, _ = model
    ours = generate(lm, params, PROMPTS, max_new_tokens=10, batch_size=2)  # two batches, the last padded
    seq = PROMPTS.copy()
    logits_fn = jax.jit(lm.logits)  # eager op-by-op dispatch of ten lengths costs ~3x more than compiling them
    for _ in range(10):  # no cache: re-run the whole sequence every step
        logits = np.asarray(logits_fn(params, jnp.asarray(seq)))
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


@pytest.mark.slow
def test_left_padded_prompts_decode_as_if_alone(model):
    _, lm, params, _ = model
    short = PROMPTS[1, 2:]
    padded = np.concatenate([[0, 0], short])[None]
    out = generate(lm, params, padded, np.array([[0, 0, 1, 1, 1, 1]]), max_new_tokens=8)
    alone = generate(lm, params, short[None], max_new_tokens=8)
    np.testing.assert_array_equal(out, alone)


@pytest.mark.slow
def test_sharded_generation_equals_one_device(model):
    _, lm, params, path = model
    ref = generate(lm, params, PROMPTS, max_new_tokens=6)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    s_lm, s_params = split_model(from_pretrained(path, mesh=mesh, dtype="float32"))
    np.testing.assert_array_equal(generate(s_lm, s_params, PROMPTS, max_new_tokens=6, mesh=mesh), ref)


@pytest.mark.slow
def test_batch_is_split_as_the_rules_say(monkeypatch):
    # Rules that put the batch on every mesh axis: 8 ways on a fsdp=4 x tensor=2 mesh, not data x fsdp = 4.
    config = ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8
    )
    lm, params = split_model(init_model(config.replace(dtype="float32"), seed=1, mesh=sharding.single_device_mesh()))
    prompts = np.random.default_rng(1).integers(0, 64, (5, 4))
    ref = generate(lm, params, prompts, max_new_tokens=3)

    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    rules = [("batch", ("data", "fsdp", "tensor"))] + [r for r in sharding.DEFAULT_RULES if r[0] != "batch"]
    placed = []
    original = sharding.host_to_global
    monkeypatch.setattr(
        sharding, "host_to_global", lambda tree, shardings: placed.append(original(tree, shardings)) or placed[-1]
    )
    sharded = jax.device_put(params, param_shardings(lm.config, mesh))
    out = generate(lm, sharded, prompts, max_new_tokens=3, mesh=mesh, rules=rules, batch_size=2)
    np.testing.assert_array_equal(out, ref)
    batch = placed[0][0]
    assert batch.shape[0] == 8 and batch.sharding.shard_shape(batch.shape)[0] == 1  # one row per device
