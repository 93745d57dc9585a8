"""Model families are registered objects: config parsing, loading, export, counting and generation go through them."""

import collections
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxunlearn.models import (
    ModelConfig,
    UnsupportedModelError,
    family,
    get_family,
    register_family,
    split_model,
    supported_model_types,
)
from jaxunlearn.models import registry as family_registry
from jaxunlearn.models.generation import generate
from jaxunlearn.models.gpt_neox import GPTNeoXFamily
from jaxunlearn.models.hf_checkpoint import CheckpointError, from_pretrained, save_pretrained
from jaxunlearn.models.llama import LlamaFamily, MistralFamily, Qwen2Family
from jaxunlearn.parallel import sharding
from jaxunlearn.training import flops
from tests.tiny_models import make_hf_model, padded_batch, torch_logits


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: families registered in a test are gone after it."""
    monkeypatch.setattr(family_registry, "_FAMILIES", dict(family_registry._FAMILIES))


def test_builtin_families_are_registered():
    assert supported_model_types() == ("llama", "mistral", "qwen2", "gpt_neox")
    assert isinstance(get_family("llama"), LlamaFamily)
    assert isinstance(get_family("gpt_neox"), GPTNeoXFamily)
    assert isinstance(get_family("mistral"), MistralFamily)
    assert isinstance(get_family("qwen2"), Qwen2Family)
    assert family(ModelConfig(model_type="qwen2")) is get_family("qwen2") is ModelConfig(model_type="qwen2").family
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported; supported model types: llama, mistral"):
        get_family("gpt2")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        ModelConfig(model_type="gpt2")


def test_a_model_type_cannot_be_taken_twice(registry):
    with pytest.raises(ValueError, match="'llama' is already registered by LlamaFamily"):

        @register_family
        class Impostor(LlamaFamily):
            model_type = "llama"


class _RenamedLlama(LlamaFamily):
    """A made-up family: Llama, but config.json calls the MLP width ``ffn_dim`` and the checkpoint names the
    embedding ``model.wte.weight``. Every hook counts its calls."""

    model_type = "renamed_llama"
    architecture = "RenamedLlamaForCausalLM"
    calls: collections.Counter = collections.Counter()

    def config_from_hf(self, hf):
        self.calls["config_from_hf"] += 1
        return super().config_from_hf({**hf, "intermediate_size": hf["ffn_dim"]})

    def config_to_hf(self, config):
        self.calls["config_to_hf"] += 1
        hf = super().config_to_hf(config)
        hf["ffn_dim"] = hf.pop("intermediate_size")
        return hf

    def hf_tensors(self, config):
        self.calls["hf_tensors"] += 1
        table = super().hf_tensors(config)
        return [
            dataclasses.replace(t, name="model.wte.weight") if t.name.endswith("embed_tokens.weight") else t
            for t in table
        ]

    def num_params(self, config):
        self.calls["num_params"] += 1
        return super().num_params(config)

    def forward_flops_per_token(self, config, seq_len):
        self.calls["forward_flops_per_token"] += 1
        return super().forward_flops_per_token(config, seq_len)

    def module(self, config, *, rngs):
        self.calls["module"] += 1
        return super().module(config, rngs=rngs)

    def init_cache(self, config, batch, slots, dtype=None):
        self.calls["init_cache"] += 1
        return super().init_cache(config, batch, slots, dtype)


def _write_renamed_checkpoint(hf_model, path):
    """``hf_model`` saved by transformers, then rewritten in the made-up family's format."""
    hf_model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="renamed_llama", architectures=["RenamedLlamaForCausalLM"], ffn_dim=config["intermediate_size"]
    )
    del config["intermediate_size"]
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    tensors["model.wte.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, path / "model.safetensors")


@pytest.mark.slow
def test_a_registered_family_routes_parsing_loading_export_and_generation(registry, tmp_path):
    hf_model = make_hf_model("llama_mha_untied")
    _write_renamed_checkpoint(hf_model, tmp_path / "src")
    mesh = sharding.single_device_mesh()
    with pytest.raises(UnsupportedModelError, match="'renamed_llama' is not supported"):
        from_pretrained(tmp_path / "src", mesh=mesh)

    register_family(_RenamedLlama)
    calls = _RenamedLlama.calls
    calls.clear()
    model = from_pretrained(tmp_path / "src", mesh=mesh, dtype="float32")
    assert model.config.model_type == "renamed_llama" and model.config.intermediate_size == 48
    assert calls["config_from_hf"] == 1 and calls["hf_tensors"] >= 1 and calls["module"] >= 1
    # The weights landed where the family's table says: the logits are transformers' on the original model.
    tokens, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - torch_logits(hf_model, tokens, mask))[mask.astype(bool)].max() < 1e-4

    assert model.config.num_params == sum(p.numel() for p in hf_model.parameters())
    flops.forward_flops_per_token(model.config, 16)
    assert calls["num_params"] >= 1 and calls["forward_flops_per_token"] == 1

    out = save_pretrained(model, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["RenamedLlamaForCausalLM"] and written["ffn_dim"] == 48
    assert "intermediate_size" not in written and calls["config_to_hf"] == 1
    assert "model.wte.weight" in load_file(out / "model.safetensors")

    lm, params = split_model(model)
    generated = generate(lm, params, tokens[:, :4], max_new_tokens=3)
    assert calls["init_cache"] >= 1
    seq = tokens[:, :4]
    for _ in range(3):  # uncached argmax decoding as the reference
        seq = np.concatenate([seq, np.asarray(lm.logits(params, jnp.asarray(seq)))[:, -1].argmax(-1)[:, None]], 1)
    np.testing.assert_array_equal(generated, seq[:, 4:])


def test_the_family_table_decides_which_tensors_a_checkpoint_needs(registry, tmp_path):
    register_family(_RenamedLlama)
    make_hf_model("llama_mha_untied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="renamed_llama", ffn_dim=config["intermediate_size"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing: model.wte.weight; unexpected: model.embed_tokens.weight"):
        from_pretrained(tmp_path, mesh=sharding.single_device_mesh())


@pytest.mark.parametrize(
    ("family_cls", "hf", "expected"),
    [
        (LlamaFamily, {"attention_bias": True, "mlp_bias": True}, (True, True, True)),
        (MistralFamily, {"attention_bias": True, "mlp_bias": True}, (False, False, False)),
        (Qwen2Family, {}, (True, False, False)),
        (GPTNeoXFamily, {}, (True, True, True)),
        (GPTNeoXFamily, {"attention_bias": False}, (False, False, True)),
    ],
)
def test_bias_layout_is_the_familys(family_cls, hf, expected):
    # As transformers: Llama has biases only when asked, Mistral never, Qwen2 always on q/k/v, GPT-NeoX on the
    # attention unless attention_bias is false and always in the MLP.
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = ModelConfig.from_hf({**base, **hf, "model_type": family_cls.model_type})
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == expected
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_missing_config_key_is_named():
    with pytest.raises(UnsupportedModelError, match=r"config.json \(model_type 'llama'\) has no 'num_hidden_layers'"):
        ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=16, num_attention_heads=2))


NEOX = dict(model_type="gpt_neox", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


@pytest.mark.parametrize(
    "hf",
    [
        dict(num_attention_heads=2),  # no RoPE keys: transformers' defaults (base 10000, 25%)
        dict(num_attention_heads=2, rotary_pct=0.5, rotary_emb_base=500),  # Pythia's config.json (transformers 4)
        dict(num_attention_heads=4, rope_parameters=dict(rope_theta=123, partial_rotary_factor=1.0)),  # transformers 5
        # rope_parameters win over the legacy keys; top-level rope_theta/partial_rotary_factor are not read
        dict(num_attention_heads=2, rope_parameters=dict(rope_theta=77), rotary_pct=0.5, rotary_emb_base=9),
        dict(num_attention_heads=2, rope_theta=5.0, partial_rotary_factor=0.5),
        dict(num_attention_heads=2, rope_scaling=dict(type="linear", factor=2.0), rotary_pct=1.0),
    ],
)
def test_gpt_neox_rotary_keys_are_read_as_transformers_reads_them(hf):
    import transformers

    config = ModelConfig.from_hf({**NEOX, **hf})
    theirs = transformers.GPTNeoXConfig.from_dict(json.loads(json.dumps({**NEOX, **hf}))).rope_parameters
    assert config.rope_theta == theirs["rope_theta"]
    assert config.partial_rotary_factor == theirs["partial_rotary_factor"]
    assert (dict(config.rope_scaling or {}).get("factor"), config.rope_scaling is None) == (
        theirs.get("factor"),
        theirs["rope_type"] == "default",
    )
    # What we write is read back the same, by us and by transformers.
    written = config.to_hf()
    assert ModelConfig.from_hf(written) == config
    again = transformers.GPTNeoXConfig.from_dict(json.loads(json.dumps(written))).rope_parameters
    assert {k: again[k] for k in ("rope_theta", "partial_rotary_factor", "rope_type")} == {
        k: theirs[k] for k in ("rope_theta", "partial_rotary_factor", "rope_type")
    }


@pytest.mark.parametrize(
    ("hf", "named"),
    [
        (dict(hidden_act="gelu_10"), "hidden_act='gelu_10'"),
        (dict(rotary_pct=0.375), r"rotary_pct \(partial_rotary_factor\)=0.375 rotates 3"),  # head_dim 8
        (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope scaling type 'dynamic'"),
        (dict(hidden_size=30), "hidden_size=30 is not a multiple of num_attention_heads=4"),
    ],
)
def test_gpt_neox_refuses_what_it_does_not_implement(hf, named):
    with pytest.raises(UnsupportedModelError, match=named):
        ModelConfig.from_hf({**NEOX, "num_attention_heads": 4, **hf})
