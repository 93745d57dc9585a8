"""Tiny random Hugging Face checkpoints, made by transformers/torch itself, for parity tests.

Parameters are re-drawn with a larger scale than transformers' init (norm weights around 1, biases non-zero)
so that a wrong layout, a missing bias or a wrong norm shows up in the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 96

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}

# name -> (config class, model class, config kwargs). Each covers one family variant of the foundation issue.
VARIANTS = {
    "llama_mha_untied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama_gqa_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, rope_theta=500.0, rope_scaling=LLAMA3_ROPE),
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "llama_biases": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    ),
    "llama_wide_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_mixed_windows": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    # Pythia's layout: parallel residual, RoPE on a quarter of each 16-dim head (4 dims), exact GELU, biases.
    "gpt_neox_pythia": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_attention_heads=2, rotary_pct=0.25)),
    "gpt_neox_sequential_tied": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            use_parallel_residual=False,
            rotary_pct=1.0,
            rotary_emb_base=500,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            attention_bias=False,
            tie_word_embeddings=True,
            hidden_act="gelu_new",
            layer_norm_eps=1e-2,
        ),
    ),
}


def make_hf_model(variant: str, seed: int = 0, num_layers: int = 3) -> torch.nn.Module:
    cfg_cls, model_cls, extra = VARIANTS[variant]
    eps = "layer_norm_eps" if cfg_cls == "GPTNeoXConfig" else "rms_norm_eps"
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        **{eps: 1e-5},
    )
    config = getattr(transformers, cfg_cls)(**{**sizes, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # norm scales around 1; LayerNorm biases as others
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_hf_model(variant: str, directory: Path, **kwargs) -> torch.nn.Module:
    model = make_hf_model(variant, **kwargs)
    model.save_pretrained(directory)
    return model


def padded_batch(seed: int = 0, batch: int = 3, length: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens with right padding: full, partly padded and mostly padded rows."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(batch, length), dtype=np.int64)
    lengths = [length, length - 3, 4][:batch] + [length] * max(0, batch - 3)
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    tokens = np.where(mask == 1, tokens, 0)
    return tokens, mask


def torch_logits(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask))
    return out.logits.float().numpy()


def make_tokenizer(vocab_size: int = VOCAB):
    """A small BPE tokenizer (trained here, offline) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    text = ["the quick brown fox jumps over the lazy dog", "machine unlearning of pretrained language models"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


WORDS = (
    "the quick brown fox jumps over the lazy dog machine unlearning of pretrained language models removes "
    "documents from a model while keeping its utility on other text gradient ascent descent retain forget"
).split()


def write_documents(path: Path, n: int, seed: int, words_per_doc: int = 60) -> Path:
    """``n`` pseudo-random documents as JSON lines (``text`` column)."""
    import json

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=words_per_doc))}) + "\n")
    return path


def write_tiny_setup(root: Path, variant: str = "llama_gqa_tied") -> dict[str, Path]:
    """A tiny HF model directory with its tokenizer, and forget/retain JSONL files."""
    model_dir = root / "model"
    save_hf_model(variant, model_dir)
    make_tokenizer().save_pretrained(model_dir)
    return {
        "model": model_dir,
        "forget": write_documents(root / "forget.jsonl", 8, seed=1),
        "retain": write_documents(root / "retain.jsonl", 12, seed=2),
        "approximate": write_documents(root / "approximate.jsonl", 8, seed=3),
        "general": write_documents(root / "general.jsonl", 6, seed=4),
    }


def load_config_file(name: str, preset: str = "builtin"):
    """``configs/<name>.py``'s ``get_config(preset)``, as the CLI would load it."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def tiny_run_config(setup: dict[str, Path], method: str, cache_dir: Path, **train):
    """A method config (paper preset) pointed at a tiny setup: fp32, 32-token chunks, small batches."""
    config = load_config_file(method, "arxiv")
    config.model.path = str(setup["model"])
    config.model.dtype = "float32"
    config.data.forget.path = str(setup["forget"])
    config.data.retain.path = str(setup["retain"])
    config.data.approximate.path = str(setup["approximate"])
    config.data.general.path = str(setup["general"])
    for split in ("forget", "retain", "approximate", "general"):
        config.data[split].name = ""
    config.evaluation.verbatim.prompt_tokens = 8
    config.evaluation.verbatim.new_tokens = 8
    config.evaluation.verbatim.max_chunks = 16
    config.data.max_length = 32
    config.data.cache_dir = str(cache_dir)
    config.optim.lr = 1e-3
    config.train.micro_batch_size = 4
    config.train.grad_accum_steps = 2
    config.checkpoint.every_steps = 1
    config.mesh.fsdp, config.mesh.tensor = 4, 2  # the tests' 8 fake CPU devices
    for key, value in train.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def current_and_reference(root: Path, variant: str = "llama_mha_untied"):
    """Two tiny models of ``variant`` (seeds 0 and 1) as jaxunlearn loads them in fp32 on one device, and as torch
    models: ``(lm, params, ref_params, torch_current, torch_reference)``."""
    from jaxunlearn.models import split_model
    from jaxunlearn.models.hf_checkpoint import from_pretrained
    from jaxunlearn.parallel import sharding

    current = save_hf_model(variant, root / "current", seed=0)
    reference = save_hf_model(variant, root / "reference", seed=1)
    mesh = sharding.single_device_mesh()
    lm, params = split_model(from_pretrained(root / "current", mesh=mesh, dtype="float32"))
    _, ref_params = split_model(from_pretrained(root / "reference", mesh=mesh, dtype="float32"))
    return lm, params, ref_params, current, reference
