"""Meshes and sharded execution on XLA's 8 fake CPU devices."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxunlearn.config import ConfigError, base_config, validate
from jaxunlearn.models import ModelConfig, init_model
from jaxunlearn.models.hf_checkpoint import from_pretrained
from jaxunlearn.parallel import sharding
from jaxunlearn.parallel.sharding import MeshConfig, MeshError, make_mesh
from tests.tiny_models import padded_batch, save_hf_model


def _forward(model, tokens, mask, mesh):
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params, tokens, mask):
        return nnx.merge(graphdef, params)(tokens, mask)

    with sharding.activation_sharding(mesh):
        return np.asarray(run(params, tokens, mask))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    # 4 heads / 2 KV heads / vocab 96 / mlp 48 / embed 32 all divide fsdp=4 and tensor=2.
    save_hf_model("qwen2_bias_tied", path / "qwen2")
    save_hf_model("llama_mha_untied", path / "llama")
    save_hf_model("gpt_neox_pythia", path / "gpt_neox")  # fused q/k/v read shard by shard
    return path


@pytest.mark.parametrize("variant", ["qwen2", "llama", "gpt_neox"])
@pytest.mark.parametrize("shape", [dict(data=1, fsdp=4, tensor=2), dict(data=8, fsdp=1, tensor=1)])
@pytest.mark.slow
def test_sharded_forward_equals_single_device(checkpoint, variant, shape):
    tokens, mask = padded_batch(batch=8)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    one = sharding.single_device_mesh()
    ref = _forward(from_pretrained(checkpoint / variant, mesh=one, dtype="float32"), tokens, mask, one)

    mesh = make_mesh(**shape)
    model = from_pretrained(checkpoint / variant, mesh=mesh, dtype="float32")
    batch_sharding = sharding.named_sharding(("batch", "length"), sharding.DEFAULT_RULES, mesh, tokens.shape)
    out = _forward(model, jax.device_put(tokens, batch_sharding), jax.device_put(mask, batch_sharding), mesh)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_parameters_are_really_sharded(checkpoint):
    mesh = make_mesh(fsdp=4, tensor=2)
    model = from_pretrained(checkpoint / "llama", mesh=mesh, dtype="float32")
    params = nnx.state(model, nnx.Param)
    expect = {
        ("embedding",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("layers", "attn", "q_proj"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "o_proj"): P(None, "tensor", None, "fsdp"),
        ("layers", "mlp", "gate_proj"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down_proj"): P(None, "tensor", "fsdp"),
        ("layers", "attn_norm", "scale"): P(None, None),
    }
    for path, spec in expect.items():
        value = params
        for key in path:
            value = value[key]
        array = value.get_value()
        assert array.sharding.spec == spec, path
        shard = array.addressable_shards[0].data
        full, part = np.prod(array.shape), np.prod(shard.shape)
        assert part == full // (8 if spec != P(None, None) else 1), path
    # data parallelism alone replicates the parameters
    data_model = from_pretrained(checkpoint / "llama", mesh=make_mesh(data=8, fsdp=1), dtype="float32")
    q = nnx.state(data_model, nnx.Param)["layers"]["attn"]["q_proj"].get_value()
    assert q.addressable_shards[0].data.shape == q.shape


@pytest.mark.slow
def test_random_init_is_sharded_and_deterministic():
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    a = init_model(config, seed=3, mesh=make_mesh(fsdp=4, tensor=2))
    b = init_model(config, seed=3, mesh=sharding.single_device_mesh())
    c = init_model(config, seed=4, mesh=sharding.single_device_mesh())
    gate = nnx.state(a, nnx.Param)["layers"]["mlp"]["gate_proj"].get_value()
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    pa, pb, pc = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (a, b, c))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(pa, pb))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(pa, pc))
    std = float(np.std(np.asarray(gate)))
    assert 0.015 < std < 0.025  # normal(0, initializer_range=0.02)


def test_mesh_shapes_and_errors():
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(MeshConfig(data=8, fsdp=1)).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(MeshError, match="do not divide the 8 available devices"):
        make_mesh(fsdp=-1, tensor=3)
    with pytest.raises(MeshError, match="needs 4 devices but 8 are available"):
        make_mesh(data=1, fsdp=2, tensor=2)
    with pytest.raises(MeshError, match="at most one axis may be -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(MeshError, match="positive or -1"):
        make_mesh(tensor=0)


def _gpus(*processes: int) -> list[SimpleNamespace]:
    """Stand-ins for GPU devices on hosts ``processes`` (what JAX's hybrid mesh helper reads of a device)."""
    return [SimpleNamespace(id=i, process_index=p, platform="gpu", device_kind="fake") for i, p in enumerate(processes)]


def test_multislice_mesh_spans_the_data_axis_over_slices():
    # MaxText's convention: data/fsdp/tensor shape one slice, the global data axis is data x dcn_data.
    assert MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=2).ici_shape(8) == (1, 2, 2)
    assert MeshConfig(data=2, fsdp=-1, tensor=1, dcn_data=2).shape(8) == (4, 2, 1)
    with pytest.raises(MeshError, match="dcn_data=3 does not divide the 8 available devices"):
        MeshConfig(dcn_data=3).shape(8)
    with pytest.raises(MeshError, match="needs 8 devices but 4 are in each slice"):
        MeshConfig(data=2, fsdp=2, tensor=2, dcn_data=2).shape(8)
    # CPU and GPU devices have no slices: each process is one, and this test is one process.
    with pytest.raises(MeshError, match=r"dcn_data=2 must equal the number of processes \(cpu devices"):
        make_mesh(MeshConfig(dcn_data=2))
    # Two GPU hosts of four devices: each index of the global data axis lies on one host, whose devices carry
    # the per-slice fsdp x tensor block.
    grid = sharding.hybrid_device_grid(MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=2), _gpus(0, 0, 0, 0, 1, 1, 1, 1))
    assert grid.shape == (2, 2, 2)
    assert [{d.process_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
    with pytest.raises(MeshError, match=r"here 3 \(4 devices, 2 devices, 2 devices\)"):
        sharding.hybrid_device_grid(MeshConfig(dcn_data=2), _gpus(0, 0, 0, 0, 1, 1, 2, 2))


def test_the_multi_controller_runtime_is_joined_once(monkeypatch):
    # The comparison runs several unlearning runs in one process, each asking to join; a second
    # jax.distributed.initialize() would raise.
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append("initialize"))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    sharding.initialize_distributed()
    sharding.initialize_distributed()
    assert calls == ["initialize"]


def test_mesh_dcn_data_is_validated_with_the_config():
    config = base_config("ga")
    assert config.mesh.dcn_data == 1
    for bad in (0, -1):  # the type is ConfigDict's (an int field)
        config.mesh.dcn_data = bad
        with pytest.raises(ConfigError, match=f"config.mesh.dcn_data={bad}: >= 1"):
            validate(config)


def test_tensor_axis_must_divide_heads(checkpoint):
    # 4 attention heads and 2 KV heads: tensor=4 cannot split the KV heads.
    with pytest.raises(MeshError, match="kv_heads=2 cannot be split over mesh axes .*tensor"):
        from_pretrained(checkpoint / "qwen2", mesh=make_mesh(fsdp=2, tensor=4), dtype="float32")
    with pytest.raises(MeshError, match="heads=4 cannot be split"):
        from_pretrained(checkpoint / "llama", mesh=make_mesh(fsdp=1, tensor=8), dtype="float32")


def test_rules_are_data():
    mesh = make_mesh(fsdp=4, tensor=2)
    rules = sharding.normalize_rules([["batch", ["data", "fsdp"]], ["embed", "tensor"], ["mlp", None]])
    assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (32, 48)) == P("tensor", None)
    # a mesh axis is used once per array: activations keep `embed` whole when `batch` took fsdp
    assert sharding.logical_to_spec(("batch", "length", "embed"), sharding.DEFAULT_RULES, mesh, (8, 4, 32)) == P(
        "fsdp", None, None
    )
    with pytest.raises(MeshError, match="unknown mesh axis"):
        sharding.normalize_rules([["embed", "model"]])
    with pytest.raises(MeshError, match="no sharding rule"):
        sharding.logical_to_spec(("embed", "experts"), rules, mesh)


def test_loading_reads_only_each_devices_block(checkpoint, monkeypatch):
    """Every weight matrix is read shard by shard (1/8 of it per read on fsdp=4 x tensor=2), never whole."""
    from jaxunlearn.models import hf_checkpoint

    reads = []
    original = hf_checkpoint._SafetensorsReader.read

    def spy(self, name, index):
        block = original(self, name, index)
        reads.append((name, block.size, int(np.prod(self.shape(name)))))
        return block

    monkeypatch.setattr(hf_checkpoint._SafetensorsReader, "read", spy)
    from_pretrained(checkpoint / "llama", mesh=make_mesh(fsdp=4, tensor=2), dtype="float32")
    matrices = [(n, b, f) for n, b, f in reads if "norm" not in n]
    assert matrices and all(b * 8 == f for n, b, f in matrices), [m for m in matrices if m[1] * 8 != m[2]][:3]
