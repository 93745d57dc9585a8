"""Architecture description shared by the Llama-family decoders, read from and written to HF ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "dot_product_attention")
# A window this large means "full causal attention" (per-layer windows are scanned as data).
NO_WINDOW = 2**30

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture jaxunlearn does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a decoder; hashable so it can live in an NNX graph definition.

    ``param_dtype`` is the storage dtype of the weights (fp32 master weights by default); ``dtype`` is the
    compute dtype of matmuls and activations (bf16 by default). Norms, softmax and RoPE run in fp32, and
    logits are produced in fp32.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Sorted (key, value) pairs of the HF rope scaling dict, or None for plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # One entry per layer: NO_WINDOW for full causal attention, else the sliding-window size.
    sliding_windows: tuple[int, ...] = ()
    initializer_range: float = 0.02
    # numerics / memory
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "none"
    attention_impl: str = "xla"
    # The source config.json (JSON text, so the dataclass stays hashable); written back on export.
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype") from e
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (NO_WINDOW,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers")
        if self.attention_impl == "dot_product_attention" and len(set(self.sliding_windows)) > 1:
            raise ValueError("attention_impl='dot_product_attention' needs the same attention window in every layer")
        if self.rope_scaling is not None:
            rope_type = dict(self.rope_scaling).get("rope_type", "default")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Number of parameters (embedding and head counted separately unless tied)."""
        e, m, h, k, d = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = e * h * d * 2 + e * k * d * 2 + (h + 2 * k) * d * self.qkv_bias + e * self.o_bias
        mlp = 3 * e * m + (2 * m + e) * self.mlp_bias
        per_layer = attn + mlp + 2 * e
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * per_layer + e + head

    # --- Hugging Face config.json ------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict. ``overrides`` set numerics (dtype, remat, ...)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            hint = (
                " (it asks for custom code via auto_map; jaxunlearn never runs remote code)" if "auto_map" in hf else ""
            )
            raise UnsupportedModelError(
                f"model_type {model_type!r}{hint} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (architectures {', '.join(_ARCHITECTURES.values())})"
            )
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu)")
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        layers = hf["num_hidden_layers"]
        rope_theta, rope_scaling = _rope_from_hf(hf)
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        # Bias layout per family, as in transformers: Qwen2 has q/k/v biases; Llama has them (and an o_proj
        # bias) only with attention_bias, and an MLP bias with mlp_bias; Mistral has none.
        attention_bias = model_type == "llama" and bool(hf.get("attention_bias", False))
        qkv_bias = model_type == "qwen2" or attention_bias
        mlp_bias = model_type == "llama" and bool(hf.get("mlp_bias", False))
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=mlp_bias,
            sliding_windows=_windows_from_hf(hf, model_type, layers),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            hf_config_json=json.dumps(hf, sort_keys=True),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """A ``config.json`` dict that transformers loads as the matching ``*ForCausalLM``."""
        hf: dict[str, Any] = json.loads(self.hf_config_json) if self.hf_config_json else {}
        rope: dict[str, Any] = {"rope_type": "default"}
        if self.rope_scaling:
            rope = dict(self.rope_scaling)
        rope["rope_theta"] = self.rope_theta
        hf.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
        )
        # Old-style key kept in sync for transformers 4.x readers.
        hf["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if self.model_type == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        windows = set(self.sliding_windows) - {NO_WINDOW}
        if self.model_type == "mistral":
            hf["sliding_window"] = windows.pop() if windows else None
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = bool(windows)
            if windows:
                hf["sliding_window"] = windows.pop()
            hf["layer_types"] = [
                "full_attention" if w == NO_WINDOW else "sliding_attention" for w in self.sliding_windows
            ]
        if torch_dtype is not None:
            hf["torch_dtype"] = torch_dtype  # transformers 4.x
            hf["dtype"] = torch_dtype  # transformers 5.x
        return hf


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """Accept both the transformers 4 (``rope_theta`` + ``rope_scaling``) and 5 (``rope_parameters``) forms."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    merged = {**scaling, **params}
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.pop("type", None)
    rope_type = merged.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, tuple(sorted(merged.items()))


def _windows_from_hf(hf: dict[str, Any], model_type: str, layers: int) -> tuple[int, ...]:
    if model_type == "mistral":
        window = hf.get("sliding_window")
        return ((window or NO_WINDOW),) * layers
    if model_type == "qwen2":
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types")
        if window is None:
            return (NO_WINDOW,) * layers
        if types is None:
            first = hf.get("max_window_layers", layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        return tuple(window if t == "sliding_attention" else NO_WINDOW for t in types)
    return (NO_WINDOW,) * layers
