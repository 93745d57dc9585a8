"""The planner: TPU slice names, per-chip memory of the real step compiled for a TPU topology (libtpu, no TPU),
the search, and the settings it recommends run for real on fake CPU devices."""

import dataclasses
import importlib
import json
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxunlearn.config import ConfigError, base_config
from jaxunlearn.data.batches import StepBatcher
from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import get_method
from jaxunlearn.models import ModelConfig, hf_checkpoint, init_model, split_model
from jaxunlearn.parallel import sharding
from jaxunlearn.planning.planner import plan_mesh, plan_settings, plan_step, settings_flags
from jaxunlearn.planning.search import lean_settings, search, with_settings
from jaxunlearn.planning.topology import GENERATIONS, Topology, TopologyError, parse_topology
from jaxunlearn.training.step import StepSetup, init_state

TINY = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# 4.3 billion parameters in one layer: 48 GiB of fp32 weights and AdamW moments over 4 chips of 16 GiB, before
# gradients and activations.
HUGE = {**TINY, "vocab_size": 262144, "hidden_size": 8192, "num_hidden_layers": 1, "intermediate_size": 256}
search_module = importlib.import_module("jaxunlearn.planning.search")  # the package exports search() by that name


@pytest.fixture(scope="module")
def libtpu():
    pytest.importorskip("libtpu", reason='the planner compiles for TPUs with libtpu (pip install "jax[tpu]")')


def shape_dir(tmp_path_factory, name: str, hf: dict):
    directory = tmp_path_factory.mktemp(name)
    (directory / "config.json").write_text(json.dumps(hf))
    return directory


def plan_config(model_dir, method="ga_kl", **train):
    config = base_config(method, preset="arxiv")
    config.optim.warmup_ratio = 0.0  # a real first step (warmup starts at learning rate 0)
    config.model.path = str(model_dir)
    config.data.max_length = 64
    config.train.micro_batch_size = train.get("micro", 4)
    config.train.grad_accum_steps = train.get("accum", 4)
    config.train.logits_chunk_size = 32
    config.evaluation.batch_size = 4
    return config


# --- slice names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "chips", "shape"),
    [
        ("v5e-16", 16, (4, 4)),
        ("v5litepod-8", 8, (2, 4)),
        ("v4-8", 4, (2, 2, 1)),
        ("v4-32", 16, (2, 2, 4)),
        ("v5p-8", 4, (2, 2, 1)),
        ("v6e-8", 8, (2, 4)),
        ("v5e:2x2", 4, (2, 2)),
    ],
)
def test_slice_names_follow_cloud_tpu_accelerator_types(name, chips, shape):
    topology = parse_topology(name)
    assert (topology.chips, topology.shape) == (chips, shape)


@pytest.mark.parametrize("bad", ["v5e", "v5e-12", "v4-6", "v9-8", "v5e:4x4x4", "tpu"])
def test_bad_slice_names_are_refused_by_name(bad):
    with pytest.raises(TopologyError, match="--topology"):
        parse_topology(bad)


# --- memory of the compiled step -----------------------------------------------------------------------------


def fsdp4_parameter_bytes() -> int:
    """TINY's fp32 parameter bytes per chip split 4 ways by hand: every weight has a hidden-size dimension (64,
    split 4 ways); the norm scales are not split."""
    h, m, v, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"], TINY["num_hidden_layers"]
    kv = h // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    split = 2 * v * h + layers * (2 * h * h + 2 * h * kv + 3 * h * m)
    norms = (2 * layers + 1) * h
    return 4 * (split // 4 + norms)


def test_parameter_and_optimizer_bytes_per_chip_are_the_fsdp_split(libtpu, tmp_path_factory):
    plan = plan_step(plan_config(shape_dir(tmp_path_factory, "tiny", TINY)), parse_topology("v5e:2x2"))
    assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert plan.train.parameters == fsdp4_parameter_bytes()
    # AdamW keeps two fp32 moments per parameter, plus step counters of a few bytes.
    assert 0 <= plan.train.optimizer - 2 * plan.train.parameters <= 64
    assert plan.train.reference == plan.train.parameters  # ga_kl's frozen copy, in the fp32 master dtype here
    assert plan.train.fits and plan.evaluation is not None and plan.evaluation.fits
    assert plan.tokens_per_step == 2 * 16 * 64  # forget + retain, 16 chunks of 64 tokens


def test_multislice_spans_the_data_axis_over_slices_as_main_does(libtpu, tmp_path_factory):
    # Two v5e:2x2 slices: mesh.data/fsdp/tensor shape one slice, mesh.dcn_data=2 (what --slices=2 sets) stacks
    # the slices along data, as sharding.make_mesh does for main.
    config = plan_config(shape_dir(tmp_path_factory, "tiny_slices", TINY), method="ga", micro=8, accum=2)
    topology = parse_topology("v5e:2x2", slices=2)
    mesh = plan_mesh(config, topology)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
    settings = lean_settings(config, topology, "none", 2)
    assert (settings["mesh.data"], settings["mesh.fsdp"], settings["mesh.dcn_data"]) == (1, 2, 2)
    assert "--config.mesh.data=1 --config.mesh.fsdp=2 --config.mesh.tensor=2 --config.mesh.dcn_data=2" in (
        settings_flags(settings)
    )
    with pytest.raises(ConfigError, match="dcn_data=3: the planned topology 2x v5e-4 has 2 slice"):
        plan_mesh(with_settings(config, {"mesh.dcn_data": 3}), topology)
    plan = plan_step(config, topology, evaluation=False)
    assert plan.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and plan.settings["mesh.dcn_data"] == 2
    assert plan.train.parameters == fsdp4_parameter_bytes()  # each slice holds a whole fsdp-split copy


def test_a_model_too_large_for_the_slice_does_not_fit(libtpu, tmp_path_factory):
    config = plan_config(shape_dir(tmp_path_factory, "huge", HUGE), method="ga")
    plan = plan_step(config, parse_topology("v5e:2x2"), evaluation=False)
    assert plan.train.parameters + plan.train.optimizer > 0.75 * plan.train.hbm
    assert plan.train.total > plan.train.hbm and not plan.fits


def test_the_command_line_reports_does_not_fit_with_exit_status_1(libtpu, tmp_path_factory):
    model = shape_dir(tmp_path_factory, "huge_cli", HUGE)
    cmd = [
        sys.executable,
        "-m",
        "jaxunlearn.commands.plan",
        "--config=configs/ga.py:arxiv",
        "--topology=v5e:2x2",
        "--json",
    ]
    cmd += [f"--config.model.path={model}", "--config.data.max_length=64", "--noevaluation"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["fits"] is False and out["train"]["total"] > 16


def fsdp4_adapter_params(rank: int) -> int:
    """TINY's LoRA adapter parameters one chip holds with fsdp=4 (every linear weight of every layer), by hand:
    PEFT's ``A`` is ``[rank, in]`` and ``B`` ``[out, rank]``; a hidden-size dimension is split 4 ways (embed ->
    fsdp), the intermediate (mlp -> tensor=1) and key/value (32) dimensions are not."""
    h, m, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    kv = h // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    linear = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]  # (in, out): q k v o gate up down
    per_chip = lambda n: n // 4 if n == h else n  # noqa: E731
    return rank * layers * sum(per_chip(i) + per_chip(o) for i, o in linear)


@pytest.mark.parametrize("method", ["ga", "ga_kl"])
def test_lora_plans_the_frozen_base_and_the_adapters_optimizer_state(libtpu, tmp_path_factory, method):
    config = plan_config(shape_dir(tmp_path_factory, f"tiny_lora_{method}", TINY), method=method)
    config.lora.rank = 4
    plan = plan_step(config, parse_topology("v5e:2x2"))
    adapters = fsdp4_adapter_params(4)
    assert adapters == 4736  # of 8192 in all: the split is by dimension, not a plain quarter
    # The frozen base in lora.base_dtype (bfloat16), passed to the step whether or not the method has a reference,
    # which it then is: no second copy.
    assert plan.train.parameters == fsdp4_parameter_bytes() // 2
    assert plan.train.reference == 0
    # AdamW's two fp32 moments of the adapters only (plus step counters), and fp32 gradient sums of the adapters.
    assert 0 <= plan.train.optimizer - 8 * adapters <= 64
    assert plan.train.gradients <= 4 * adapters
    # Evaluation: the bf16 base with the fp32 adapters attached (no merged copy), the adapters' state resident; the
    # export's merge (fp32 out: the tiny checkpoint's dtype) is the larger program and so the one reported.
    assert plan.evaluation is not None
    assert plan.evaluation.parameters == fsdp4_parameter_bytes() // 2 + 4 * adapters
    assert plan.evaluation.optimizer == plan.train.optimizer and plan.evaluation.reference == 0
    merged = fsdp4_parameter_bytes()
    assert plan.evaluation.total >= plan.evaluation.parameters + plan.evaluation.optimizer + merged
    # The printed flags reproduce the plan.
    assert plan.settings["lora.rank"] == 4 and plan.settings["lora.base_dtype"] == "bfloat16"
    assert "--config.lora.rank=4 --config.lora.base_dtype='bfloat16'" in settings_flags(plan.settings)
    assert "lora.rank" not in plan_settings(with_settings(config, {"lora.rank": 0}))
    assert plan_settings(with_settings(base_config(method, preset="arxiv"), plan.settings)) == plan.settings
    only_q = with_settings(config, {"lora.targets": r".*\.q_proj\.weight"})  # not the default: shown, shell-quoted
    flags = shlex.split(settings_flags(plan_settings(only_q)))
    assert flags[-3:] == [
        "--config.lora.rank=4",
        "--config.lora.base_dtype=bfloat16",
        r"--config.lora.targets=.*\.q_proj\.weight",
    ]


# Full fine-tuning of WIDE needs about 62 MiB per chip (fp32 weights, AdamW moments, gradients), LoRA at most 28 MiB
# (its export's merge: the merged fp32 model next to the bf16 base).
WIDE = {**TINY, "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1}


def test_search_proposes_lora_when_no_full_fine_tuning_setting_fits(libtpu, tmp_path_factory, monkeypatch, capsys):
    from jaxunlearn.commands import plan as plan_command

    monkeypatch.setattr(search_module, "REMAT_BY_RECOMPUTE", ("full",))  # the leanest policy only: fewer compiles
    config = plan_config(shape_dir(tmp_path_factory, "wide", WIDE), method="ga", micro=1, accum=1)
    config.evaluation.batch_size = 1
    one_chip = Topology(dataclasses.replace(GENERATIONS["v5e"], hbm_gib=48 / 1024), (1, 1))  # 48 MiB of HBM
    result = search(config, one_chip)
    assert result.exhausted and result.best is not None and result.best.fits
    assert result.lora_fallback
    assert [("lora.rank" in p.settings, p.fits) for p in result.plans] == [(False, False), (True, True)]
    assert result.best.settings["lora.rank"] == 16 and result.best.settings["lora.base_dtype"] == "bfloat16"
    assert result.best.train.optimizer < 0.02 * result.plans[0].train.optimizer
    plan_command._report_search(result, as_json=False)
    out = capsys.readouterr().out
    assert "no full fine-tuning setting fits: this is a LoRA setting" in out
    assert "recommended LoRA" in out and "--config.lora.rank=16 --config.lora.base_dtype='bfloat16'" in out


def test_shipped_shapes_resolve_offline_and_have_the_published_sizes():
    published = {
        "yi-6b": 6.06e9,
        "llama-2-7b": 6.74e9,
        "llama-3-8b": 8.03e9,
        "mistral-7b": 7.24e9,
        "qwen2.5-7b": 7.62e9,
        "pythia-1b": 1.01e9,  # 1,011,781,632 (Pythia paper, Table 1)
        "pythia-6.9b": 6.86e9,  # 6,857,302,016
    }
    assert hf_checkpoint.shape_names() == sorted(published)
    for name, params in published.items():
        model_dir = hf_checkpoint.resolve_model_dir(f"shapes:{name}")
        config = ModelConfig.from_hf(hf_checkpoint.read_hf_config(model_dir))
        assert abs(config.num_params - params) / params < 0.005, name
    with pytest.raises(hf_checkpoint.CheckpointError, match="known: llama-2-7b"):
        hf_checkpoint.resolve_model_dir("shapes:gpt-9")


# --- the search, and its recommendation run for real ------------------------------------------------------


def one_step(config, mesh, seed=0):
    """Metrics and updated parameters of one real train step of ``config`` on ``mesh``."""
    hf = json.loads((hf_checkpoint.resolve_model_dir(config.model.path) / "config.json").read_text())
    model_config = ModelConfig.from_hf(hf, param_dtype="float32", dtype="float32", remat=config.model.remat)
    rules = config.mesh.rules
    lm, params = split_model(init_model(model_config, seed=seed, mesh=mesh, rules=rules))
    setup = StepSetup.for_run(config, model_config, mesh, total_steps=10)
    ref_dtype = config.model.reference_dtype or "float32"
    # Another model as the reference, so KL terms and their gradients are not zero.
    _, reference = split_model(init_model(model_config, seed=seed + 1, mesh=mesh, rules=rules))
    reference = jax.tree.map(lambda x: x.astype(ref_dtype), reference)
    t = config.train
    shapes = StepBatcher.abstract_batch(t.micro_batch_size, t.grad_accum_steps, config.data.max_length, retain=True)
    rng = np.random.default_rng(0)
    batch = jax.tree.map(lambda s: rng.integers(1, model_config.vocab_size, s.shape).astype(np.int32), shapes)
    for split in batch.values():
        split["mask"] = np.ones_like(split["mask"])
        split["chunk_id"] = np.arange(split["chunk_id"].size, dtype=np.int32).reshape(split["chunk_id"].shape)
        split["prompt_length"] = np.zeros_like(split["prompt_length"])  # plain text
    ctx = Context.for_run(lm, config.method, seed=0, tokenizer=None, chunk_size=t.logits_chunk_size)
    step, b_shardings = setup.compile(get_method(config.method.name), ctx, batch, reference=True)
    state = init_state(params, setup.tx, setup.shardings)
    reference = jax.device_put(reference, setup.param_shardings)
    state, metrics = step(state, reference, sharding.host_to_global(batch, b_shardings))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}, jax.device_get(state["params"])


def assert_same_step(a, b):
    """The same loss, per-term values and gradient norm (to fp32 summation order), and the same parameters."""
    (metrics_a, params_a), (metrics_b, params_b) = a, b
    assert np.isfinite(metrics_a["loss"]) and metrics_a["grad_norm"] > 0
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert abs(metrics_a[key] - metrics_b[key]) <= 1e-5 * max(1.0, abs(metrics_a[key])), key
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_search_recommends_a_setting_that_trains_like_the_default(libtpu, tmp_path_factory):
    config = plan_config(shape_dir(tmp_path_factory, "tiny_search", TINY), micro=4, accum=4)
    result = search(config, parse_topology("v5e:2x2"), max_compiles=8)
    assert result.best is not None and result.best.fits
    assert result.best.settings["model.remat"] == "none"  # the tiny model fits without recompute
    # Every compiled candidate fitted, so the greedy search took every improvement it tried.
    assert all(p.fits for p in result.plans) and len(result.plans) >= 2
    recommended = with_settings(config, result.best.settings)
    devices = jax.devices()[:4]
    mesh = sharding.make_mesh(sharding.MeshConfig(1, -1, 1), devices=devices)
    rec = recommended.mesh
    rec_mesh = sharding.make_mesh(sharding.MeshConfig(rec.data, rec.fsdp, rec.tensor), devices=devices)
    assert_same_step(one_step(config, mesh), one_step(recommended, rec_mesh))


@pytest.mark.slow
def test_one_pass_per_split_gives_the_gradient_of_one_pass_for_both(tmp_path_factory):
    # GA+KL: an ascent term on forget chunks, a KL term with a reference forward on retain chunks.
    config = plan_config(shape_dir(tmp_path_factory, "tiny_split", TINY), method="ga_kl", micro=4, accum=2)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, -1, 1), devices=jax.devices()[:4])
    assert_same_step(one_step(config, mesh), one_step(with_settings(config, {"train.split_passes": True}), mesh))
