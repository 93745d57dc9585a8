"""Reading real-world config.json files (transformers 4 and 5 styles) into ModelConfig."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxunlearn.models import ModelConfig
from jaxunlearn.models.rope import inverse_frequencies
from jaxunlearn.models.spec import NO_WINDOW

# Yi-6B's config.json as published (transformers 4 style).
YI_6B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 5000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0",
    "use_cache": True,
    "vocab_size": 64000,
}


def test_yi_6b_config():
    c = ModelConfig.from_hf(YI_6B)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (32, 32, 4, 128, 64000)
    assert c.rope_theta == 5e6 and c.rope_scaling is None and not c.tie_word_embeddings
    assert c.sliding_windows == (NO_WINDOW,) * 32
    # Yi-6B has 6.06B parameters.
    assert 6.0e9 < c.num_params < 6.1e9
    assert ModelConfig.from_hf(c.to_hf("bfloat16")) == c


@pytest.mark.parametrize("style", ["v4_type", "v4_rope_type", "v5"])
def test_llama3_rope_in_every_config_style(style):
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = dict(YI_6B, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)
    if style == "v4_type":
        hf = dict(base, rope_theta=500000.0, rope_scaling=dict(rope, type="llama3"))
    elif style == "v4_rope_type":
        hf = dict(base, rope_theta=500000.0, rope_scaling=dict(rope, rope_type="llama3"))
    else:
        hf = dict(base, rope_parameters=dict(rope, rope_type="llama3", rope_theta=500000.0))
        hf.pop("rope_theta", None)
        hf.pop("rope_scaling", None)
    c = ModelConfig.from_hf(hf)
    assert c.rope_theta == 500000.0
    assert dict(c.rope_scaling)["rope_type"] == "llama3"
    # Inverse frequencies equal transformers' own computation for the same config.
    torch_cfg = LlamaConfig(
        **{k: v for k, v in base.items() if k not in ("architectures", "torch_dtype")},
        rope_parameters=dict(rope, rope_type="llama3", rope_theta=500000.0),
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](torch_cfg, torch.device("cpu"))
    np.testing.assert_allclose(inverse_frequencies(c), ref.numpy(), rtol=1e-6)


def test_qwen2_windows_follow_max_window_layers():
    hf = {
        "model_type": "qwen2",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 2,
    }
    c = ModelConfig.from_hf(hf)
    assert c.sliding_windows == (NO_WINDOW, NO_WINDOW, 16, 16)
    assert c.qkv_bias and not c.o_bias
    assert ModelConfig.from_hf(dict(hf, use_sliding_window=False)).sliding_windows == (NO_WINDOW,) * 4


def test_bad_numerics_settings_are_rejected():
    with pytest.raises(ValueError, match="remat='sometimes'"):
        ModelConfig.from_hf(YI_6B, remat="sometimes")
    with pytest.raises(ValueError, match="dtype='float13' is not a dtype"):
        ModelConfig.from_hf(YI_6B, dtype="float13")
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(dict(YI_6B, hidden_act="gelu"))


def test_every_config_accepts_the_books_preset():
    """``:books`` (PG-19 from a TFDS data_dir) is a preset of every shipped config, validated like arxiv/github."""
    from jaxunlearn.config import BOOKS_SPLITS, PRESETS, ConfigError, validate
    from jaxunlearn.config.files import config_files
    from tests.tiny_models import load_config_file

    assert "books" in PRESETS
    for name in config_files():
        config = load_config_file(name, "books")
        config.model.path = "01-ai/Yi-6B"
        validate(config)
        assert config.data.forget.path == BOOKS_SPLITS["forget"] and config.data.forget.column == "book_text"
        assert config.data.approximate.path == BOOKS_SPLITS["approximate"]
        general = "general" in name
        assert config.data.retain.path == ("llmunlearn/unlearn_dataset" if general else BOOKS_SPLITS["retain"])
    config.data.retain.tfds_data_dir = "gs:/bucket/tfds"
    with pytest.raises(ConfigError, match=r"^config.data.retain.tfds_data_dir=gs:/bucket/tfds: malformed URL"):
        validate(config)
