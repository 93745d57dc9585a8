"""The Llama-family decoder in Flax NNX: Llama 2/3 (Yi, TinyLlama, SmolLM), Mistral and Qwen2.

The decoder is the shared core (:mod:`jaxunlearn.models.transformer`); this file holds the three families' Hugging
Face tensor table and what their ``config.json`` means (biases, tied embeddings, sliding windows, RoPE scaling):
:class:`LlamaFamily` implements everything, :class:`MistralFamily` and :class:`Qwen2Family` override only
their biases and windows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flax import nnx

from jaxunlearn.models.layouts import HFTensor
from jaxunlearn.models.registry import Family, UnsupportedModelError, register_family, required
from jaxunlearn.models.rope import rope_from_hf, rope_to_hf
from jaxunlearn.models.spec import NO_WINDOW, ModelConfig
from jaxunlearn.models.transformer import KVCache, Transformer

# --- Hugging Face tensor names ---------------------------------------------------------------------------


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """The complete parameter <-> HF tensor table for ``config`` (biases and head included as configured)."""
    layer = "model.layers.{layer}."
    table = [
        HFTensor(("embedding",), "model.embed_tokens.weight"),
        HFTensor(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight"),
        HFTensor(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight"),
    ]
    for n in "qkv":
        table.append(HFTensor(("layers", "attn", f"{n}_proj"), layer + f"self_attn.{n}_proj.weight", "heads_in"))
        if config.qkv_bias:
            table.append(HFTensor(("layers", "attn", f"{n}_bias"), layer + f"self_attn.{n}_proj.bias", "heads_bias"))
    table.append(HFTensor(("layers", "attn", "o_proj"), layer + "self_attn.o_proj.weight", "heads_out"))
    if config.o_bias:
        table.append(HFTensor(("layers", "attn", "o_bias"), layer + "self_attn.o_proj.bias"))
    for n in ("gate", "up", "down"):
        table.append(HFTensor(("layers", "mlp", f"{n}_proj"), layer + f"mlp.{n}_proj.weight", "transpose"))
        if config.mlp_bias:
            table.append(HFTensor(("layers", "mlp", f"{n}_bias"), layer + f"mlp.{n}_proj.bias"))
    table.append(HFTensor(("final_norm", "scale"), "model.norm.weight"))
    if not config.tie_word_embeddings:
        table.append(HFTensor(("lm_head",), "lm_head.weight", "transpose"))
    return table


# Buffers some old checkpoints saved next to the weights; they are recomputed from the config.
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")


# --- families ----------------------------------------------------------------------------------------------


@register_family
class LlamaFamily(Family):
    """Llama 2/3 (and Yi, TinyLlama, SmolLM): optional attention/MLP biases, no sliding windows."""

    model_type = "llama"
    architecture = "LlamaForCausalLM"

    def config_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu)")
        heads, hidden, layers = (required(hf, k) for k in ("num_attention_heads", "hidden_size", "num_hidden_layers"))
        rope_theta, rope_scaling = rope_from_hf(hf)
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        return dict(
            model_type=self.model_type,
            vocab_size=required(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=required(hf, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_windows=self.windows_from_hf(hf, layers),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            **self.biases_from_hf(hf),
        )

    def config_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "initializer_range": config.initializer_range,
            **rope_to_hf(config),
            **self.biases_to_hf(config),
            **self.windows_to_hf(config),
        }

    def biases_from_hf(self, hf: Mapping[str, Any]) -> dict[str, bool]:
        """``qkv_bias``/``o_bias``/``mlp_bias``: Llama has q/k/v/o biases with ``attention_bias``, MLP ones with
        ``mlp_bias`` (as transformers)."""
        attention_bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))

    def biases_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        """The ``config.json`` keys that make transformers build the biases ``config`` has."""
        return {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}

    def windows_from_hf(self, hf: Mapping[str, Any], layers: int) -> tuple[int, ...]:
        """Per-layer attention windows (``NO_WINDOW``: full causal attention)."""
        return (NO_WINDOW,) * layers

    def windows_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        """The ``config.json`` keys that describe ``config.sliding_windows``."""
        return {}

    def num_params(self, config: ModelConfig) -> int:
        e, m, h, k, d = (
            config.hidden_size,
            config.intermediate_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        attn = e * h * d * 2 + e * k * d * 2 + (h + 2 * k) * d * config.qkv_bias + e * config.o_bias
        mlp = 3 * e * m + (2 * m + e) * config.mlp_bias
        per_layer = attn + mlp + 2 * e
        head = 0 if config.tie_word_embeddings else e * config.vocab_size
        return config.vocab_size * e + config.num_layers * per_layer + e + head

    def hf_tensors(self, config: ModelConfig) -> list[HFTensor]:
        return hf_tensors(config)

    def ignored_hf_tensor(self, config: ModelConfig, name: str) -> bool:
        # Tied checkpoints sometimes store the head's copy of the embedding; transformers ignores it too.
        return bool(_IGNORABLE.fullmatch(name)) or (config.tie_word_embeddings and name == "lm_head.weight")

    def module(self, config: ModelConfig, *, rngs: nnx.Rngs) -> Transformer:
        return Transformer(config, rngs=rngs)

    def init_cache(self, config: ModelConfig, batch: int, slots: int, dtype: Any = None) -> KVCache:
        return KVCache.empty(config, batch, slots, dtype)


@register_family
class MistralFamily(LlamaFamily):
    """Mistral: no biases; one sliding window (``sliding_window``) for every layer."""

    model_type = "mistral"
    architecture = "MistralForCausalLM"

    def biases_from_hf(self, hf: Mapping[str, Any]) -> dict[str, bool]:
        return dict(qkv_bias=False, o_bias=False, mlp_bias=False)

    def biases_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        return {}

    def windows_from_hf(self, hf: Mapping[str, Any], layers: int) -> tuple[int, ...]:
        return ((hf.get("sliding_window") or NO_WINDOW),) * layers

    def windows_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        windows = set(config.sliding_windows) - {NO_WINDOW}
        return {"sliding_window": windows.pop() if windows else None}


@register_family
class Qwen2Family(LlamaFamily):
    """Qwen2/2.5: q/k/v biases; sliding windows per layer (``use_sliding_window``, ``layer_types`` or
    ``max_window_layers``)."""

    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"

    def biases_from_hf(self, hf: Mapping[str, Any]) -> dict[str, bool]:
        return dict(qkv_bias=True, o_bias=False, mlp_bias=False)

    def biases_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        return {}

    def windows_from_hf(self, hf: Mapping[str, Any], layers: int) -> tuple[int, ...]:
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types")
        if window is None:
            return (NO_WINDOW,) * layers
        if types is None:
            first = hf.get("max_window_layers", layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        return tuple(window if t == "sliding_attention" else NO_WINDOW for t in types)

    def windows_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        windows = set(config.sliding_windows) - {NO_WINDOW}
        hf: dict[str, Any] = {"use_sliding_window": bool(windows)}
        if windows:
            hf["sliding_window"] = windows.pop()
        hf["layer_types"] = [
            "full_attention" if w == NO_WINDOW else "sliding_attention" for w in config.sliding_windows
        ]
        return hf
