"""Export to Hugging Face format: transformers loads it and gets our logits; re-import is exact."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxunlearn.models import hf_checkpoint
from jaxunlearn.models.hf_checkpoint import from_pretrained, save_pretrained
from jaxunlearn.parallel import sharding
from tests.tiny_models import make_tokenizer, padded_batch, save_hf_model, torch_logits


@pytest.fixture(scope="module")
def one_device():
    return sharding.single_device_mesh()


def _params(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize(
    "variant",
    [
        "llama_mha_untied",
        "qwen2_bias_tied",
        "llama_biases",
        "mistral_sliding_window",
        "llama3_rope_scaling",
        "qwen2_mixed_windows",
        "gpt_neox_pythia",
        "gpt_neox_sequential_tied",
    ],
)
@pytest.mark.slow
def test_export_loads_in_transformers_and_round_trips(variant, tmp_path, one_device):
    save_hf_model(variant, tmp_path / "src")
    model = from_pretrained(tmp_path / "src", mesh=one_device, dtype="float32")
    # Perturb the weights so the export is not just a copy of the source files.
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    model = nnx.merge(graphdef, params)

    out = save_pretrained(model, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    expected_class = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "gpt_neox": "GPTNeoXForCausalLM",
    }
    assert type(hf).__name__ == expected_class[model.config.model_type]
    tokens, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    ref = torch_logits(hf, tokens, mask)
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4

    reimported = from_pretrained(out, mesh=one_device, dtype="float32")
    _assert_trees_equal(_params(model), _params(reimported))
    assert reimported.config == model.config


def test_sharded_export_with_index_and_tokenizer(tmp_path, one_device):
    save_hf_model("llama_gqa_tied", tmp_path / "src")
    model = from_pretrained(tmp_path / "src", mesh=one_device, dtype="float32")
    out = save_pretrained(model, tmp_path / "export", tokenizer=make_tokenizer(), max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert "lm_head.weight" not in index["weight_map"]  # tied
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the lazy fox")["input_ids"]
    _assert_trees_equal(_params(model), _params(from_pretrained(out, mesh=one_device, dtype="float32")))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - torch_logits(hf, tokens, mask))[mask.astype(bool)].max() < 1e-4


def test_bf16_export_keeps_dtype_and_values(tmp_path, one_device):
    save_hf_model("llama_mha_untied", tmp_path / "src")
    model = from_pretrained(tmp_path / "src", mesh=one_device, dtype="float32")
    out = save_pretrained(model, tmp_path / "export", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    back = _params(from_pretrained(out, mesh=one_device, dtype="float32"))
    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), _params(model))
    _assert_trees_equal(expected, back)


def test_interrupted_export_leaves_previous_checkpoint_intact(tmp_path, one_device, monkeypatch):
    save_hf_model("llama_mha_untied", tmp_path / "src")
    model = from_pretrained(tmp_path / "src", mesh=one_device, dtype="float32")
    out = save_pretrained(model, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(*args, **kwargs):
        yield from []
        raise OSError("disk full")

    monkeypatch.setattr(hf_checkpoint, "_export_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "export")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "src"]  # no temporary directory left


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(
    ("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)], ids=["umask022", "umask077"]
)
def test_export_permissions_follow_the_umask(tmp_path, one_device, umask, mask, dir_mode, file_mode):
    # A teammate on a shared filesystem must be able to read an export made under umask 022.
    save_hf_model("llama_gqa_tied", tmp_path / "src")
    model = from_pretrained(tmp_path / "src", mesh=one_device, dtype="float32")
    umask(mask)
    out = save_pretrained(model, tmp_path / "runs" / "hf_model", tokenizer=make_tokenizer(), max_shard_bytes=20_000)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    files = list(out.rglob("*"))
    assert len(files) > 4 and "model.safetensors.index.json" in {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(file_mode) for p in files}
    assert stat.S_IMODE((tmp_path / "runs").stat().st_mode) == dir_mode  # a parent created for the export
