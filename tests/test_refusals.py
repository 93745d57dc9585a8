"""Every refusal of the checkpoint loader says what is wrong and names the culprit."""

import json
import re
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxunlearn.models.hf_checkpoint as hfc
from jaxunlearn.models import UnsupportedModelError
from jaxunlearn.models.hf_checkpoint import CheckpointError, from_pretrained, load_tokenizer
from jaxunlearn.parallel import sharding
from tests.tiny_models import make_tokenizer, save_hf_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "llama"
    save_hf_model("llama_mha_untied", path)
    return path


@pytest.fixture
def ckpt(source, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    return path


def _load(path, **kwargs):
    return from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32", **kwargs)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_model_type_names_the_supported_ones(ckpt):
    _edit_config(ckpt, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        UnsupportedModelError, match=r"'gpt2' is not supported; supported model types: llama, mistral, qwen2"
    ):
        _load(ckpt)


def test_custom_code_models_are_refused(ckpt):
    _edit_config(ckpt, model_type="Yi", auto_map={"AutoModelForCausalLM": "modeling_yi.YiForCausalLM"})
    with pytest.raises(UnsupportedModelError, match="never runs remote code"):
        _load(ckpt)


def test_trust_remote_code_is_refused(ckpt):
    with pytest.raises(CheckpointError, match="trust_remote_code=True is refused"):
        _load(ckpt, trust_remote_code=True)


def test_pickle_only_weights_are_refused_without_reading_them(ckpt):
    (ckpt / "model.safetensors").unlink()
    # A pickle that would run code if it were ever unpickled.
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(CheckpointError, match=r"only has pickle-format weights \(pytorch_model.bin\)"):
        _load(ckpt)


def test_missing_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: model.layers.1.mlp.up_proj.weight"):
        _load(ckpt)


def test_mismatched_tensor_is_named_with_both_shapes(ckpt):
    _edit_config(ckpt, intermediate_size=40)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch: model.layers.0.mlp.down_proj.weight: checkpoint \(32, 48\) vs config \(32, 40\)",
    ):
        _load(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected: model.layers.0.self_attn.q_norm.weight"):
        _load(ckpt)


def test_index_pointing_to_missing_file(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="refers to model-00001-of-00002.safetensors, which is missing"):
        _load(ckpt)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        _load(tmp_path / "empty")


def test_unsupported_rope_scaling(ckpt):
    _edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn' is not supported"):
        _load(ckpt)


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub"):
        from_pretrained("acme/not-cached", cache_dir=str(tmp_path), mesh=sharding.single_device_mesh())


def test_hub_id_resolves_from_the_offline_cache(source, tmp_path):
    # The layout huggingface_hub uses in HF_HUB_CACHE: refs/main -> snapshots/<commit>/files.
    repo = tmp_path / "models--acme--tiny-llama"
    commit = "0" * 40
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert hfc.resolve_model_dir("acme/tiny-llama", cache_dir=str(tmp_path)) == repo / "snapshots" / commit
    model = from_pretrained("acme/tiny-llama", cache_dir=str(tmp_path), mesh=sharding.single_device_mesh())
    assert model.config.num_layers == 3


def _header_size(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_safetensors_is_named(ckpt, where):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + _header_size(weights)
    cut = (header_end + len(data)) // 2 if where == "data" else header_end // 2
    weights.write_bytes(data[:cut])
    with pytest.raises(
        CheckpointError, match=re.escape(str(weights)) + " is not a readable safetensors file .*truncated"
    ):
        _load(ckpt)


def test_truncated_shard_of_an_indexed_checkpoint_is_named(ckpt):
    # With an index the shards are opened only when their tensors are read.
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / fname)
    weight_map = {k: fname for fname, keys in shards.items() for k in keys}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    second = ckpt / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(f"{second} is not a readable safetensors file")):
        _load(ckpt)


def _write_raw_safetensors(path, tensors, dtypes):
    """A safetensors file written byte by byte, so a tensor can carry a dtype numpy cannot hold."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = array.tobytes() if name not in dtypes else bytes(array.size)  # 1-byte dtypes only
        header[name] = {
            "dtype": dtypes.get(name, "F32"),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_unreadable_tensor_is_named_with_its_file(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    _write_raw_safetensors(ckpt / "model.safetensors", tensors, {name: "F8_E8M0"})  # numpy has no such dtype
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / 'model.safetensors'}: cannot read tensor {name}")):
        _load(ckpt)


def test_model_without_tokenizer_files_says_which_setting_to_change(ckpt):
    with pytest.raises(
        CheckpointError, match=re.escape(str(ckpt)) + " has no tokenizer files .* set config.model.tokenizer to"
    ):
        load_tokenizer(ckpt)
    with pytest.raises(CheckpointError, match="set --tokenizer to a directory or Hub id"):
        load_tokenizer(ckpt, label="--tokenizer")


def test_broken_tokenizer_is_a_checkpoint_error_naming_the_directory(ckpt):
    make_tokenizer().save_pretrained(ckpt)
    assert len(load_tokenizer(ckpt)) > 0
    (ckpt / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=re.escape(f"could not load the tokenizer in {ckpt}")):
        load_tokenizer(ckpt)
