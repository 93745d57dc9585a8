"""The Flax decoder against transformers (torch, CPU, fp32) on the same tiny random weights."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from jaxunlearn.models import ModelConfig, abstract_model, gpt_neox, hf_checkpoint, losses, split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained, load_model
from jaxunlearn.parallel import sharding
from tests.tiny_models import VARIANTS, make_hf_model, padded_batch, save_hf_model, torch_logits


@pytest.fixture(scope="module")
def one_device():
    return sharding.single_device_mesh()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.slow
def test_logits_match_transformers(variant, tmp_path, one_device):
    hf_model = save_hf_model(variant, tmp_path)
    model = from_pretrained(tmp_path, mesh=one_device, dtype="float32")
    tokens, mask = padded_batch(length=12)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    ref = torch_logits(hf_model, tokens, mask)
    valid = mask.astype(bool)
    err = np.abs(ours - ref)[valid].max()
    assert err < 1e-4, f"{variant}: max |logit diff| {err:.2e}"
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero tensors


def test_gpt_neox_checkpoint_buffers_are_skipped_and_other_extra_tensors_refused(tmp_path, one_device):
    # Pythia's files (saved by transformers 4) also hold each layer's causal-mask buffers and RoPE frequencies.
    from safetensors.numpy import load_file, save_file

    hf_model = save_hf_model("gpt_neox_pythia", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for i in range(3):
        tensors[f"gpt_neox.layers.{i}.attention.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
        tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = np.asarray(-1e9, np.float32)
        tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    model = from_pretrained(tmp_path, mesh=one_device, dtype="float32")
    tokens, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - torch_logits(hf_model, tokens, mask))[mask.astype(bool)].max() < 1e-4
    tensors["gpt_neox.layers.0.attention.extra.weight"] = np.ones(2, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"unexpected: gpt_neox.layers.0.attention.extra.weight$"):
        from_pretrained(tmp_path, mesh=one_device, dtype="float32")


@pytest.mark.parametrize("variant", ["llama_mha_untied", "gpt_neox_pythia"])
def test_residual_stream_matches_transformers_layer_outputs(variant, tmp_path, one_device):
    # RMU steers the residual stream after a decoder layer: what a forward hook on that torch layer sees (for the
    # last layer too, where transformers' output_hidden_states holds the final norm's output instead).
    hf_model = save_hf_model(variant, tmp_path)
    lm, params = split_model(from_pretrained(tmp_path, mesh=one_device, dtype="float32"))
    tokens, mask = padded_batch()
    seen = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        for layer in hf_model.base_model.layers
    ]
    torch_logits(hf_model, tokens, mask)
    for hook in hooks:
        hook.remove()
    assert len(seen) == lm.config.num_layers
    valid = mask.astype(bool)
    for layers, ref in enumerate(seen, start=1):
        ours = np.asarray(lm.residual_stream(params, jnp.asarray(tokens), jnp.asarray(mask), layers))
        ref = ref.numpy()
        assert np.abs(ours - ref)[valid].max() < 1e-4 * max(1.0, np.abs(ref).max()), f"{variant}: after {layers}"


@pytest.mark.parametrize("name", sorted(gpt_neox.ACTIVATIONS))
def test_gpt_neox_activations_match_transformers(name):
    from transformers.activations import ACT2FN

    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    ref = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(gpt_neox.ACTIVATIONS[name](jnp.asarray(x))), ref, atol=2e-6, rtol=1e-5)


def test_hidden_states_are_returned_and_consistent(tmp_path, one_device):
    save_hf_model("llama_gqa_tied", tmp_path)
    model = from_pretrained(tmp_path, mesh=one_device, dtype="float32")
    tokens, mask = padded_batch()
    logits, hidden = model(jnp.asarray(tokens), jnp.asarray(mask), return_hidden=True)
    assert hidden.shape == (*tokens.shape, 32)
    # Tied model: logits are the hidden states times the embedding matrix.
    emb = np.asarray(model.embedding[...])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(hidden) @ emb.T, atol=1e-5)


def test_bf16_compute_stays_close_to_fp32(tmp_path, one_device):
    hf_model = save_hf_model("llama_mha_untied", tmp_path)
    model = from_pretrained(tmp_path, mesh=one_device, dtype="bfloat16")
    assert model.embedding[...].dtype == jnp.float32  # params stay fp32, compute is bf16
    tokens, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    assert ours.dtype == np.float32
    ref = torch_logits(hf_model, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() < 0.15 * np.abs(ref).max()


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
@pytest.mark.slow
def test_remat_policies_give_same_gradients(tmp_path, one_device, remat):
    save_hf_model("llama_gqa_tied", tmp_path)
    tokens, mask = (jnp.asarray(a) for a in padded_batch())

    def grads(policy):
        model = from_pretrained(tmp_path, mesh=one_device, dtype="float32", remat=policy)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "mistral_sliding_window", "qwen2_mixed_windows"])
@pytest.mark.slow
def test_query_blocked_attention_matches_transformers_with_its_gradients(variant, tmp_path, one_device, monkeypatch):
    # Long sequences attend one block of queries at a time; shrink the thresholds so a 12-token batch is blocked.
    from jaxunlearn.models import transformer

    hf_model = save_hf_model(variant, tmp_path)
    tokens, mask = padded_batch(length=12)
    model = from_pretrained(tmp_path, mesh=one_device, dtype="float32", remat="full")
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(jnp.asarray(tokens), jnp.asarray(mask))
        return jnp.sum(jax.nn.log_softmax(logits)[..., 1] * mask), logits

    whole_grads, _ = jax.grad(loss, has_aux=True)(params)
    monkeypatch.setattr(transformer, "BLOCKED_FROM", 4)
    monkeypatch.setattr(transformer, "QUERY_BLOCK", 4)
    blocked_grads, blocked = jax.grad(loss, has_aux=True)(params)
    ref = torch_logits(hf_model, tokens, mask)
    assert np.abs(np.asarray(blocked) - ref)[mask.astype(bool)].max() < 1e-4
    for a, b in zip(jax.tree.leaves(whole_grads), jax.tree.leaves(blocked_grads)):  # to summation order
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_fused_attention_matches_xla_attention(tmp_path, one_device):
    hf_model = save_hf_model("mistral_sliding_window", tmp_path)
    model = from_pretrained(tmp_path, mesh=one_device, dtype="float32", attention_impl="dot_product_attention")
    tokens, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    ref = torch_logits(hf_model, tokens, mask)
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4


def test_compiled_program_does_not_grow_with_depth():
    """Deep stacks are scanned (a program of one layer's size); short ones (up to ``LOOP_UP_TO``) are a loop."""

    def num_eqns(layers):
        config = ModelConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_layers=layers,
            num_heads=2,
            num_kv_heads=2,
            head_dim=8,
            dtype="float32",
        )
        graphdef, state = nnx.split(abstract_model(config))
        tokens = jnp.zeros((1, 8), jnp.int32)
        return len(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state).eqns)

    from jaxunlearn.models import transformer

    deep = transformer.LOOP_UP_TO + 1
    assert num_eqns(deep) == num_eqns(3 * deep)
    assert num_eqns(2) < num_eqns(3)  # unrolled below the threshold


def test_param_count_matches_transformers():
    for variant in (
        "llama_biases",
        "qwen2_bias_tied",
        "llama_wide_head_dim",
        "gpt_neox_pythia",
        "gpt_neox_sequential_tied",
    ):
        hf_model = make_hf_model(variant)
        config = ModelConfig.from_hf(hf_model.config.to_dict())
        assert config.num_params == sum(p.numel() for p in hf_model.parameters()), variant


def test_with_dtype_computes_in_fp32_exactly_as_an_fp32_model(tmp_path, one_device):
    save_hf_model("llama_gqa_tied", tmp_path)
    bf16_lm, params = split_model(from_pretrained(tmp_path, mesh=one_device, dtype="bfloat16"))
    fp32_lm, fp32_params = split_model(from_pretrained(tmp_path, mesh=one_device, dtype="float32"))
    tokens, mask = (jnp.asarray(a) for a in padded_batch())
    lm = bf16_lm.with_dtype("float32")
    assert lm.config == fp32_lm.config and bf16_lm.config.dtype == "bfloat16"
    assert jax.tree.structure(nnx.State(params)) == jax.tree.structure(nnx.State(fp32_params))
    ours = np.asarray(lm.logits(params, tokens, mask))
    np.testing.assert_array_equal(ours, np.asarray(fp32_lm.logits(fp32_params, tokens, mask)))
    # ... and the bf16 model really computed something else.
    assert not np.array_equal(ours, np.asarray(bf16_lm.logits(params, tokens, mask)))


def _model_section(**changes):
    section = dict(
        path="",
        tokenizer="",
        revision="",
        param_dtype="float32",
        dtype="bfloat16",
        reference_dtype="",
        remat="none",
        attention_impl="xla",
    )
    return ml_collections.ConfigDict({**section, **changes})


def test_load_model_takes_numerics_from_the_model_section(tmp_path, one_device):
    save_hf_model("mistral_sliding_window", tmp_path)
    cfg = _model_section(
        path=str(tmp_path), param_dtype="bfloat16", remat="dots", attention_impl="dot_product_attention"
    )
    lm, params = load_model(tmp_path, cfg, mesh=one_device)
    assert (lm.config.param_dtype, lm.config.dtype, lm.config.remat) == ("bfloat16", "bfloat16", "dots")
    assert lm.config.attention_impl == "dot_product_attention"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    lm32, params32 = load_model(tmp_path, cfg, mesh=one_device, dtype="float32")  # explicit compute dtype wins
    assert lm32.config.dtype == "float32" and lm32.config.param_dtype == "bfloat16"


def test_load_model_applies_the_revision_to_its_own_model_only(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(hf_checkpoint, "from_pretrained", lambda path, **kw: seen.append(kw["revision"]))
    monkeypatch.setattr(hf_checkpoint, "split_model", lambda model: (None, None))
    cfg = _model_section(path="acme/model", revision="v1.0")
    load_model("acme/model", cfg, mesh=None)
    load_model("acme/oracle", cfg, mesh=None)  # another repo: the model's revision names none of its commits
    load_model("acme/model", _model_section(path="acme/model"), mesh=None)
    assert seen == ["v1.0", None, None]


def _dot_precisions(fn, *args) -> set[str]:
    text = jax.jit(fn).lower(*args).as_text()
    found = re.findall(r"stablehlo.dot_general.*precision = \[(\w+), (\w+)\]", text)
    assert found, "no dot_general in the lowered program"
    return {p for pair in found for p in pair}


@pytest.mark.parametrize(("dtype", "expected"), [("float32", {"HIGHEST"}), ("bfloat16", {"DEFAULT"})])
def test_one_matmul_precision_rule_for_layers_and_vocabulary_projection(dtype, expected):
    # fp32 compute must not silently run bf16/TF32 passes on TPU/GPU: every matmul, including the losses'
    # chunked vocabulary projection, asks for HIGHEST; bf16 compute keeps the fast default.
    config = ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8
    )
    config = config.replace(dtype=dtype)
    graphdef, state = nnx.split(abstract_model(config))
    tokens = jnp.zeros((2, 8), jnp.int32)
    assert _dot_precisions(lambda s: nnx.merge(graphdef, s)(tokens), state) == expected
    hidden = jax.ShapeDtypeStruct((2, 8, 16), jnp.dtype(dtype))
    head = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    for fn in (
        lambda h, w: losses.token_logprobs(h, w, tokens, chunk_size=4),
        lambda h, w: losses.token_kl(h, w, h, w, chunk_size=4),
        lambda h, w: losses.top_token_excluding(h, w, tokens),
        lambda h, w: losses.vocabulary_stats(h, w, tokens),
    ):
        assert _dot_precisions(fn, hidden, head) == expected
