"""The architecture description shared by every model family, read from and written to HF ``config.json``.

What differs between families (which ``config.json`` keys mean what, biases, windows, parameter counts) lives in
the family objects of :mod:`jaxunlearn.models.registry`; :class:`ModelConfig` delegates to them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxunlearn.models.registry import Family, UnsupportedModelError, get_family

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "dot_product_attention")
# A window this large means "full causal attention" (per-layer windows are scanned as data).
NO_WINDOW = 2**30

__all__ = [
    "ATTENTION_IMPLS",
    "NO_WINDOW",
    "REMAT_POLICIES",
    "SUPPORTED_ROPE_TYPES",
    "ModelConfig",
    "UnsupportedModelError",
]


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
    # The leading fraction of each head's dimensions that RoPE rotates (GPT-NeoX's ``rotary_pct``); 1 rotates all.
    partial_rotary_factor: float = 1.0
    # Sorted (key, value) pairs of the HF rope scaling dict, or None for plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # GPT-NeoX: LayerNorm epsilon, MLP activation (transformers' ``hidden_act`` name), and the parallel residual
    # ``x + attn(ln1(x)) + mlp(ln2(x))``. The Llama family ignores them (RMSNorm, SwiGLU, sequential residual).
    layer_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    parallel_residual: bool = False
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
        get_family(self.model_type)  # an unregistered model_type fails here, naming the supported ones
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        rotary = int(self.head_dim * self.partial_rotary_factor)  # as transformers truncates it
        if not 0.0 <= self.partial_rotary_factor <= 1.0 or rotary % 2:
            raise ValueError(
                f"head_dim={self.head_dim} with partial_rotary_factor={self.partial_rotary_factor} rotates {rotary} "
                "dimensions; rotary embeddings need an even number of them (and a factor between 0 and 1)"
            )
        self._check_numerics()
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (NO_WINDOW,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers")
        if self.attention_impl == "dot_product_attention" and len(set(self.sliding_windows)) > 1:
            raise ValueError("attention_impl='dot_product_attention' needs the same attention window in every layer")
        if self.rope_scaling is not None:
            check_rope_type(dict(self.rope_scaling).get("rope_type", "default"))

    def _check_numerics(self) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype") from e

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def family(self) -> Family:
        """The :class:`~jaxunlearn.models.registry.Family` implementing ``model_type``."""
        return get_family(self.model_type)

    @property
    def num_params(self) -> int:
        """Number of parameters (embedding and head counted separately unless tied)."""
        return self.family.num_params(self)

    # --- Hugging Face config.json ------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict. ``overrides`` set numerics (dtype, remat, ...)."""
        family = get_family(hf.get("model_type"), remote_code="auto_map" in hf)
        fields = family.config_from_hf(hf)
        fields["hf_config_json"] = json.dumps(dict(hf), sort_keys=True)
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """A ``config.json`` dict that transformers loads as the matching ``*ForCausalLM``.

        Keys of the source ``config.json`` that jaxunlearn does not model (token ids, ...) are kept.
        """
        hf: dict[str, Any] = json.loads(self.hf_config_json) if self.hf_config_json else {}
        hf.update(self.family.config_to_hf(self))
        if torch_dtype is not None:
            hf["torch_dtype"] = torch_dtype  # transformers 4.x
            hf["dtype"] = torch_dtype  # transformers 5.x
        return hf


def check_rope_type(rope_type: str) -> None:
    """Raise :class:`UnsupportedModelError` for a RoPE scaling type jaxunlearn does not implement."""
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
