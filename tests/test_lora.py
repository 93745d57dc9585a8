"""LoRA against PEFT (torch, CPU, fp32) on the same tiny weights: the forward, one step's adapter gradients, the
merge (``merge_and_unload``), and the exported adapter loaded back with ``PeftModel.from_pretrained``."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from jaxunlearn.errors import ConfigError
from jaxunlearn.models import hf_checkpoint, lora
from jaxunlearn.parallel import sharding
from tests.tiny_models import padded_batch, save_hf_model, torch_logits

peft = pytest.importorskip("peft")

# Targets by variant: Llama's seven projections on two of its three layers; Pythia's fused query_key_value.
CASES = {
    "llama_gqa_tied": (
        r"model\.layers\.[02]\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight",
        r"model\.layers\.[02]\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    ),
    "gpt_neox_pythia": (
        r".*\.(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.weight",
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ),
}
RANK, ALPHA = 4, 8.0


def _section(targets: str, **kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**lora.default_config(), "rank": RANK, "alpha": ALPHA, "targets": targets, **kw})


def _peft_model(variant: str, directory, peft_targets):
    """The tiny HF model with PEFT LoRA adapters whose B is random too (``init_lora_weights=False``)."""
    base = save_hf_model(variant, directory)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=peft_targets, init_lora_weights=False
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # adapters as large as the weights, so that a wrong layout shows in the logits
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def one_device():
    return sharding.single_device_mesh()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory, one_device):
    """``(variant, peft model, our lm, our base params, our adapters loaded from PEFT's save)``."""
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    targets, peft_targets = CASES[variant]
    model = _peft_model(variant, root / "base", peft_targets)
    model.save_pretrained(root / "adapter")
    lm, params = hf_checkpoint.load_model(
        root / "base", {"param_dtype": "float32", "dtype": "float32"}, mesh=one_device
    )
    spec, adapters, _ = lora.load_peft(root / "adapter", lm.config)
    assert spec == lora.spec_for(_section(targets), lm.config)  # PEFT's save names exactly our targets
    return variant, model, lm.with_lora(spec), params, jax.tree.map(jnp.asarray, adapters), root


def test_forward_matches_peft(pair):
    variant, model, lm, params, adapters, _ = pair
    tokens, mask = padded_batch(length=12)
    ours = np.asarray(lm.logits(lora.attach(params, adapters), jnp.asarray(tokens), jnp.asarray(mask)))
    ref = torch_logits(model, tokens, mask)
    base = np.asarray(lm.logits(params, jnp.asarray(tokens), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() < 1e-4, variant
    assert np.abs(base - ref)[valid].max() > 1e-1  # the adapters change the logits: the check can fail


def _torch_nll(model, tokens, mask):
    out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask))
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, torch.from_numpy(tokens[:, 1:]).unsqueeze(-1)).squeeze(-1)
    m = torch.from_numpy(mask[:, 1:]).float()
    return (nll * m).sum() / m.sum()


def test_adapter_gradients_match_peft(pair):
    variant, model, lm, params, adapters, _ = pair
    tokens, mask = padded_batch(length=12)
    model.zero_grad()
    _torch_nll(model, tokens, mask).backward()
    ref = {n: p.grad.numpy() for n, p in model.named_parameters() if "lora_" in n}

    def nll(ad):
        logits = lm.logits(lora.attach(jax.lax.stop_gradient(params), ad), jnp.asarray(tokens), jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        picked = -jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
        m = jnp.asarray(mask[:, 1:], jnp.float32)
        return jnp.sum(picked * m) / jnp.sum(m)

    ours = lora.to_peft(lm.lora, jax.grad(nll)(adapters))
    # PEFT's parameter names carry the adapter name ("default"); its saved files do not.
    ref = {n.replace(".default", ""): g for n, g in ref.items()}
    assert sorted(ours) == sorted(ref)
    scale = max(np.abs(g).max() for g in ref.values())
    assert scale > 1e-3
    for name, g in ref.items():
        np.testing.assert_allclose(ours[name], g, atol=2e-5 * scale, rtol=1e-3, err_msg=f"{variant}: {name}")


def test_merge_matches_merge_and_unload(pair, tmp_path):
    variant, model, lm, params, adapters, root = pair
    merged_ref = peft.PeftModel.from_pretrained(
        type(model.get_base_model()).from_pretrained(root / "base"), root / "adapter"
    ).merge_and_unload()
    merged_ref.save_pretrained(tmp_path / "ref")
    hf_checkpoint.save_pretrained(lm.bind(lora.merge(lm.lora, lora.attach(params, adapters))), tmp_path / "ours")
    from safetensors.numpy import load_file

    ref, ours = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    ref = {k: v for k, v in ref.items() if k in ours}  # transformers may save buffers (GPT-NeoX) we do not keep
    assert sorted(ours) == sorted(ref)
    for name, value in ref.items():
        np.testing.assert_allclose(ours[name], value, atol=1e-5, err_msg=f"{variant}: {name}")


def test_exported_adapter_loads_in_peft(pair, tmp_path):
    variant, _, lm, params, adapters, root = pair
    # Our own adapters (fresh A, a random B), written in PEFT's format and read back by PEFT onto the original.
    ours = lora.init_adapters(lm.lora, lm.config.num_layers, seed=3)
    ours = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(4), x.shape), ours)
    ours = jax.tree.map(lambda x, m: x * m, ours, lora.adapter_mask(lm.lora))
    lora.save_peft(lm.lora, ours, tmp_path / "adapter", str(root / "base"))
    base = type(pair[1].get_base_model()).from_pretrained(root / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens, mask = padded_batch(length=12)
    ref = torch_logits(loaded, tokens, mask)
    got = np.asarray(lm.logits(lora.attach(params, ours), jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(got - ref)[mask.astype(bool)].max() < 1e-4, variant
    original = np.asarray(lm.logits(params, jnp.asarray(tokens), jnp.asarray(mask)))  # PEFT wraps `base` in place
    assert np.abs(ref - original)[mask.astype(bool)].max() > 1e-1


def test_bad_lora_settings_are_named(one_device, tmp_path):
    save_hf_model("llama_gqa_tied", tmp_path)
    lm, _ = hf_checkpoint.load_model(tmp_path, {"param_dtype": "float32", "dtype": "float32"}, mesh=one_device)
    with pytest.raises(ConfigError, match=r"config\.lora\.targets='.*lm_head.*': matches no decoder-layer weight"):
        lora.spec_for(_section(r"lm_head\.weight"), lm.config)
    with pytest.raises(ConfigError, match=r"config\.lora\.targets='\(': not a regular expression"):
        lora.check_config(_section("("))
    with pytest.raises(ConfigError, match=r"config\.lora\.dropout=0\.05: only 0"):
        lora.check_config(_section(lora.ALL_LINEAR, dropout=0.05))


@pytest.mark.slow
def test_lora_run_from_the_main_command_resumes_bitwise_and_exports_what_peft_loads(tmp_path):
    """``--config.lora.rank`` alone turns LoRA on: the reference is the base (KL 0 at the first step, where the
    adapters' B is 0), a kill and resume ends bit-identical, and the exported adapter on the original checkpoint in
    PEFT gives the exported merged model's logits (a float32 base: the tiny checkpoint is float32, and a bfloat16
    base would be its rounding, which PEFT on the original does not share)."""
    import json

    from safetensors.numpy import load_file

    from tests.test_cli import run_cli
    from tests.tiny_models import write_tiny_setup

    setup = {**write_tiny_setup(tmp_path / "setup"), "cache": tmp_path / "cache"}
    args = ("--config.lora.rank=4", "--config.lora.base_dtype=float32", "--config.train.max_steps=4")
    args += ("--config.checkpoint.every_steps=2",)
    straight = run_cli(setup, "ga_kl", tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "LoRA rank 4" in straight.stderr
    metrics = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["retain_kl"] < 1e-6 < 1e-4 < metrics[-1]["retain_kl"]  # float rounding at step 1, no more

    killed = run_cli(setup, "ga_kl", tmp_path / "resumed", *args, env={"JAXUNLEARN_FAULT_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9
    resumed = run_cli(setup, "ga_kl", tmp_path / "resumed", *args)
    assert resumed.returncode == 0 and "resuming ga_kl from step 2 of 4" in resumed.stderr, resumed.stderr[-3000:]
    for export in ("hf_adapter/adapter_model.safetensors", "hf_model/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / export), load_file(tmp_path / "resumed" / export)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{export}: {name}")

    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(setup["model"])
    tokens, mask = padded_batch(length=12)
    original = torch_logits(base, tokens, mask)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "straight" / "hf_adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "hf_model")
    valid = mask.astype(bool)
    assert np.abs(torch_logits(adapted, tokens, mask) - torch_logits(merged, tokens, mask))[valid].max() < 1e-4
    assert np.abs(torch_logits(merged, tokens, mask) - original)[valid].max() > 1e-3  # it did unlearn something

    # evaluate's reading of an adapter directory: the base its config names, the adapters applied layer by layer.
    from types import SimpleNamespace

    from jaxunlearn.commands.evaluate import _with_adapter, adapter_base

    adapter = str(tmp_path / "straight" / "hf_adapter")
    assert adapter_base(adapter) == str(setup["model"]) and adapter_base(adapter, "other/base") == "other/base"
    mesh = sharding.single_device_mesh()
    lm, params = hf_checkpoint.load_model(setup["model"], {"param_dtype": "float32", "dtype": "float32"}, mesh=mesh)
    prep = SimpleNamespace(
        model_config=lm.config, mesh=mesh, config=ml_collections.ConfigDict({"mesh": {"rules": None}})
    )
    lm, params = _with_adapter(prep, lm, params, adapter)
    ours = np.asarray(lm.logits(params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - torch_logits(merged, tokens, mask))[valid].max() < 1e-4


def test_peft_variants_this_implementation_does_not_compute_are_refused_by_name(pair, tmp_path):
    import json
    import shutil

    _, _, lm, _, _, root = pair
    shutil.copytree(root / "adapter", tmp_path / "adapter")
    config_file = tmp_path / "adapter" / lora.ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: use_dora=True, rank_pattern=\{'q_proj': 8\} not supp"):
        lora.load_peft(tmp_path / "adapter", lm.config)


def test_greedy_generation_with_adapters_equals_the_merged_model(pair):
    """The KV-cached decoder (verbatim, TOFU and MUSE generate with it) applies the adapters as the forward does."""
    from jaxunlearn.models.generation import greedy_tokens

    _, _, lm, params, adapters, _ = pair
    tokens, mask = padded_batch(length=8)
    prompts = jnp.asarray(np.where(mask[:, ::-1] == 1, tokens[:, ::-1], 0))  # left-padded
    prompt_mask = jnp.asarray(mask[:, ::-1])
    attached = np.asarray(greedy_tokens(lm, lora.attach(params, adapters), prompts, prompt_mask, 6))
    merged = np.asarray(greedy_tokens(lm, lora.merge(lm.lora, lora.attach(params, adapters)), prompts, prompt_mask, 6))
    base = np.asarray(greedy_tokens(lm, params, prompts, prompt_mask, 6))
    np.testing.assert_array_equal(attached, merged)
    assert (attached != base).any()  # the adapters change what is generated
