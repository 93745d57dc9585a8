"""Training dynamics and mechanics: behaviour of the objectives, sharding invariance, gradient
accumulation, the learning-rate schedule, non-finite losses."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from jaxunlearn.methods.context import Context
from jaxunlearn.methods.registry import get_method
from jaxunlearn.models import param_shardings, split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained
from jaxunlearn.parallel import sharding
from jaxunlearn.run.engine import NonFiniteError, unlearn
from jaxunlearn.storage.checkpoints import Checkpointer
from jaxunlearn.training.step import (
    batch_shardings,
    compile_train_step,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from tests.tiny_models import padded_batch, save_hf_model, tiny_run_config, write_tiny_setup


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "model"
    save_hf_model("qwen2_bias_tied", path)
    return path


def _split(seed, batch):
    tokens, mask = padded_batch(seed=seed, batch=batch, length=16)
    return {"tokens": tokens, "mask": mask, "chunk_id": np.arange(batch, dtype=np.int32)}


def _nll(lm, params, split):
    ctx = Context(lm, hparams={})
    return float(jnp.mean(ctx.nll(params, jax.tree.map(jnp.asarray, split))))


def _sgd_run(checkpoint, method_name, steps, lr):
    lm, params = split_model(from_pretrained(checkpoint, mesh=sharding.single_device_mesh(), dtype="float32"))
    method = get_method(method_name)
    ctx = Context(lm, hparams=method.hparams)
    tx = optax.sgd(lr)
    step = jax.jit(make_train_step(method, ctx, tx, optax.constant_schedule(lr)))
    forget, retain = _split(0, 4), _split(1, 4)
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], {"forget": forget, "retain": retain})
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    before = (_nll(lm, params, forget), _nll(lm, params, retain))
    for _ in range(steps):
        state, _ = step(state, None, batch)
    after = (_nll(lm, state["params"], forget), _nll(lm, state["params"], retain))
    return before, after


@pytest.mark.slow
def test_ga_raises_forget_nll_and_ga_gd_protects_retain(checkpoint):
    (f0, r0), (f_ga, r_ga) = _sgd_run(checkpoint, "ga", steps=5, lr=0.05)
    (_, _), (f_gd, r_gd) = _sgd_run(checkpoint, "ga_gd", steps=5, lr=0.05)
    assert f_ga > f0 + 0.1, (f0, f_ga)
    assert f_gd > f0 + 0.1, (f0, f_gd)
    assert r_gd - r0 < r_ga - r0, (r0, r_ga, r_gd)


def _run_steps(checkpoint, mesh, method_name, steps, batches, sgd=False):
    lm, params = split_model(from_pretrained(checkpoint, mesh=mesh, dtype="float32"))
    method = get_method(method_name)
    optim = ml_collections.ConfigDict(
        # lr 1e-3: Adam divides by sqrt(v) + eps, so a parameter whose gradient is ~1e-8 moves by up to lr with a
        # direction set by rounding; a smaller lr keeps that rounding noise under the 1e-5 tolerance.
        dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, warmup_ratio=0.0, schedule="cosine", clip_norm=1.0)
    )
    tx, schedule = make_optimizer(optim, total_steps=10)
    if sgd:  # the update is exactly -lr x gradient (Adam's first step is ~sign(g), which amplifies rounding)
        tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    p_sh = param_shardings(lm.config, mesh)
    s_sh = state_shardings(tx, p_sh, mesh)
    ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=p_sh)(params) if method.needs().reference else None
    state = init_state(params, tx, s_sh)
    ctx = Context(lm, hparams=method.hparams, chunk_size=5)
    b_sh = batch_shardings(batches[0], mesh)
    step = compile_train_step(make_train_step(method, ctx, tx, schedule), s_sh, p_sh if ref else None, b_sh, mesh)
    losses = []
    with sharding.activation_sharding(mesh):
        for i in range(steps):
            batch = jax.device_put(batches[i], b_sh)
            state, metrics = step(state, ref, batch)
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"])


def _stack(splits, micro, accum):
    return jax.tree.map(lambda x: x.reshape(accum, micro, *x.shape[1:]), splits)


@pytest.mark.slow
def test_sharding_invariance_three_steps(checkpoint):
    batches = [_stack({"forget": _split(10 + i, 8), "retain": _split(20 + i, 8)}, 4, 2) for i in range(3)]
    one_losses, one_params = _run_steps(checkpoint, sharding.single_device_mesh(), "ga_kl", 3, batches)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    many_losses, many_params = _run_steps(checkpoint, mesh, "ga_kl", 3, batches)
    np.testing.assert_allclose(many_losses, one_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(many_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(one_losses[0], one_losses[2])  # the steps did something


def _run_lora_steps(checkpoint, mesh, steps, batches):
    """GA+KL with rank-4 LoRA adapters through the run's step: ``(losses, adapters, adapter shardings)``."""
    from jaxunlearn.models import lora
    from jaxunlearn.training.step import adapter_shardings

    lm, base = split_model(from_pretrained(checkpoint, mesh=mesh, dtype="float32"))
    section = ml_collections.ConfigDict({**lora.default_config(), "rank": 4, "alpha": 8.0})
    spec = lora.spec_for(section, lm.config)
    method = get_method("ga_kl")
    optim = ml_collections.ConfigDict(
        dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, warmup_ratio=0.0, schedule="cosine", clip_norm=1.0)
    )
    tx, schedule = make_optimizer(optim, total_steps=10)
    a_sh = adapter_shardings(spec, lm.config, mesh, sharding.normalize_rules(None))
    s_sh = state_shardings(tx, a_sh, mesh)
    state = init_state(jax.device_put(lora.init_adapters(spec, lm.config.num_layers, seed=0), a_sh), tx, s_sh)
    ctx = Context(lm, hparams=method.hparams, chunk_size=5)
    b_sh = batch_shardings(batches[0], mesh)
    train = make_train_step(method, ctx, tx, schedule, lora_spec=spec, reference=True)
    step = compile_train_step(train, s_sh, param_shardings(lm.config, mesh), b_sh, mesh)
    losses = []
    with sharding.activation_sharding(mesh):
        for i in range(steps):
            state, metrics = step(state, base, jax.device_put(batches[i], b_sh))
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"]), a_sh


@pytest.mark.slow
def test_lora_sharding_invariance_three_steps(checkpoint):
    """LoRA's adapters, sharded like the weights they adapt, train to the same numbers on one device and on 8."""
    batches = [_stack({"forget": _split(10 + i, 8), "retain": _split(20 + i, 8)}, 4, 2) for i in range(3)]
    one_losses, one, _ = _run_lora_steps(checkpoint, sharding.single_device_mesh(), 3, batches)
    many_losses, many, shardings = _run_lora_steps(checkpoint, sharding.make_mesh(fsdp=4, tensor=2), 3, batches)
    np.testing.assert_allclose(many_losses, one_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert one_losses[0] != one_losses[2]  # the steps did something
    assert any(s.spec != P() and any(s.spec) for s in jax.tree.leaves(shardings))  # adapters really are split


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(checkpoint):
    splits = {"forget": _split(3, 8), "retain": _split(4, 8)}
    mesh = sharding.single_device_mesh()
    big_loss, big = _run_steps(checkpoint, mesh, "ga_gd", 1, [_stack(splits, 8, 1)], sgd=True)
    acc_loss, acc = _run_steps(checkpoint, mesh, "ga_gd", 1, [_stack(splits, 2, 4)], sgd=True)
    np.testing.assert_allclose(acc_loss, big_loss, atol=1e-6)
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(acc)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("total", [1, 5, 34, 100])
def test_schedule_matches_hf_trainer(total):
    """Linear warmup (ceil(0.03 x steps), first step at lr 0) then cosine, as transformers computes it."""
    optim = ml_collections.ConfigDict(dict(lr=2e-5, warmup_ratio=0.03, schedule="cosine"))
    ours = learning_rate_schedule(optim, total)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    warmup = int(np.ceil(0.03 * total))
    hf = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(total):
        expected = hf.get_last_lr()[0]
        assert abs(float(ours(step)) - expected) < 1e-12 + 1e-6 * 2e-5, (step, float(ours(step)), expected)
        opt.step()
        hf.step()


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
    setup = write_tiny_setup(tmp_path)
    config = tiny_run_config(setup, "ga", tmp_path / "cache", optim__lr=1e30, train__max_steps=6)
    with pytest.raises(NonFiniteError, match=r"step 3: the loss .* not finite.*last good checkpoint \(step 2\)"):
        unlearn(config, tmp_path / "run")
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_step() == 2
    meta = ckpt.read_meta(2)
    assert meta["step"] == 2 and meta["forget_chunks_seen"] == 16
    ckpt.close()


def _tensorboard_scalars(directory):
    """Parse TFRecord event files by hand: [len u64][crc u32][Event proto][crc u32]."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in directory.iterdir():
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow
def test_run_record_metrics_and_tensorboard(tmp_path):
    setup = write_tiny_setup(tmp_path)
    config = tiny_run_config(setup, "ga_kl", tmp_path / "cache", train__max_steps=3)
    record = unlearn(config, tmp_path / "run")
    assert record["status"] == "completed"
    assert record["environment"]["mesh"]["shape"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert record["dtypes"] == {
        "param": "float32",
        "compute": "float32",
        "reference": "float32",
        "evaluation": "float32",
    }
    assert record["config"]["optim"]["lr"] == 1e-3 and record["seed"] == 42
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tb = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in tb["train/retain_kl"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in tb["train/forget_nll"]], [x["forget_nll"] for x in lines], rtol=1e-6)
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] > 0  # warmup starts at 0, as HF does


def test_tokenizer_that_does_not_fit_the_model_is_refused_before_compute(tmp_path):
    from jaxunlearn.data import DataError
    from jaxunlearn.run.engine import prepare
    from tests.tiny_models import make_tokenizer

    setup = write_tiny_setup(tmp_path)
    big = make_tokenizer()
    big.add_tokens([f"word{i}" for i in range(100)])
    assert len(big) > 96
    big.save_pretrained(tmp_path / "big_tokenizer")
    config = tiny_run_config(setup, "ga", tmp_path / "cache")
    config.model.tokenizer = str(tmp_path / "big_tokenizer")
    with pytest.raises(DataError, match=r"has \d+ tokens but the model's vocab_size is 96"):
        prepare(config)


def test_sharding_rules_come_from_the_config(tmp_path):
    """Parameters follow `config.mesh.rules`; a rule naming an unknown mesh axis is a config error."""
    from jaxunlearn.config import ConfigError, validate
    from jaxunlearn.models import ModelConfig

    setup = write_tiny_setup(tmp_path)
    config = tiny_run_config(setup, "ga", tmp_path / "cache")
    config.mesh.rules = tuple((name, None if name == "mlp" else axes) for name, axes in config.mesh.rules)
    validate(config)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    hf_config = json.loads((setup["model"] / "config.json").read_text())
    shardings = param_shardings(ModelConfig.from_hf(hf_config), mesh, config.mesh.rules)
    assert shardings["layers"]["mlp"]["gate_proj"].spec == P(None, "fsdp", None)  # mlp no longer on tensor
    config.mesh.rules = (("embed", "model"),)
    with pytest.raises(ConfigError, match="config.mesh.rules: .*unknown mesh axis"):
        validate(config)


@pytest.mark.slow
def test_cap_margin_derives_the_cap_from_the_originals_unseen_nll(tmp_path):
    """``forget_nll_cap_margin``: the cap is the original's mean chunk NLL on the approximate split (from its
    report) plus the margin, and training with it equals training with that cap given in nats."""
    from jaxunlearn.config import ConfigError, validate

    setup = write_tiny_setup(tmp_path)
    margin = 0.05

    def run_config(**method):
        config = tiny_run_config(setup, "ga_gd", tmp_path / "cache", train__max_steps=3)
        config.evaluation.metrics = ("perplexity",)  # what the cap is derived from; the rest is not needed here
        config.method.update(method)
        return config

    config = run_config(forget_nll_cap_margin=margin)
    record = unlearn(config, tmp_path / "margin")
    report = json.loads((tmp_path / "margin" / "report.json").read_text())
    approximate_ppl = report["models"]["original"]["perplexity"]["approximate"]["ppl"]
    cap = record["derived_hparams"]["forget_nll_cap"]
    assert cap == pytest.approx(math.log(approximate_ppl) + margin, abs=1e-9)

    assert "derived_hparams" not in unlearn(run_config(forget_nll_cap=cap), tmp_path / "explicit")

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"], m["forget_nll"]) for m in map(json.loads, lines) if m["split"] == "train"]

    assert losses("margin") == losses("explicit") and len(losses("margin")) == 3
    unlearn(run_config(), tmp_path / "uncapped")
    assert losses("uncapped")[0] != losses("margin")[0]  # the cap binds here, so the equality above means something

    config.method.forget_nll_cap = 5.0
    with pytest.raises(ConfigError, match="forget_nll_cap_margin=0.05: give forget_nll_cap or its margin"):
        validate(config)
    config.method.forget_nll_cap, config.evaluation.enabled = 0.0, False
    with pytest.raises(ConfigError, match="forget_nll_cap_margin=0.05: .* needs config.evaluation.enabled"):
        validate(config)
