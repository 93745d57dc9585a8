"""Model families and sharded construction.

Every supported Hugging Face ``model_type`` is a :class:`~jaxunlearn.models.registry.Family` object in a
registry: it reads and writes its ``config.json``, counts its parameters and FLOPs, maps its parameters to HF
tensors, builds its NNX module and its KV cache. Adding a family means adding one module with a
``@register_family`` class and importing it below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxunlearn.errors import DTYPE, DTYPE_OR_DEFAULT, check_rules

# Importing a family's module registers it; the registry keeps this order (llama, mistral, qwen2, then gpt_neox).
from jaxunlearn.models import llama  # noqa: F401

# isort: split
from jaxunlearn.models import gpt_neox  # noqa: F401

# isort: split
import jaxunlearn.models.lora as lora_lib
from jaxunlearn.models.registry import (
    Family,
    UnsupportedModelError,
    get_family,
    register_family,
    supported_model_types,
)
from jaxunlearn.models.spec import ATTENTION_IMPLS, REMAT_POLICIES, ModelConfig
from jaxunlearn.parallel import sharding

__all__ = [
    "Family",
    "LanguageModel",
    "ModelConfig",
    "UnsupportedModelError",
    "abstract_model",
    "family",
    "get_family",
    "init_model",
    "param_shardings",
    "register_family",
    "split_model",
    "supported_model_types",
]


def family(config: ModelConfig) -> Family:
    """The family object implementing ``config.model_type``."""
    return get_family(config.model_type)


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes, dtypes and axes without allocating anything."""
    return nnx.eval_shape(lambda: family(config).module(config, rngs=nnx.Rngs(0)))


def init_model(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, rules=None) -> nnx.Module:
    """A randomly initialised model whose parameters are created directly in their mesh shardings.

    Weights are ``normal(0, initializer_range)``, norms ones, biases zeros (as transformers initialises).
    ``mesh`` defaults to all devices on ``fsdp``.
    """
    mesh = mesh or sharding.make_mesh()
    graphdef, abs_state = nnx.split(abstract_model(config))
    shardings = sharding.param_shardings(abs_state, mesh, rules)

    @jax.jit
    def create():
        state = nnx.state(family(config).module(config, rngs=nnx.Rngs(seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, create())


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A model's structure without its weights: pure functions of a parameter dict.

    Losses, training and evaluation hold parameters as plain nested dicts of arrays (easy to shard, checkpoint
    and optimise) and rebuild the NNX module around them at trace time.
    """

    graphdef: Any
    config: ModelConfig
    lora: lora_lib.LoraSpec | None = None  # the adapters a params dict may hold under lora.LORA_KEY

    def bind(self, params: dict) -> nnx.Module:
        """The NNX module with ``params`` as its parameters (the base's, without any LoRA adapters)."""
        return nnx.merge(self.graphdef, lora_lib.split(params)[0])

    def adapters(self, params: dict) -> tuple[lora_lib.LoraSpec, dict] | None:
        """``(spec, adapters)`` when ``params`` hold LoRA adapters (the ``lora`` argument of the module's
        ``hidden_states``), else None."""
        adapters = lora_lib.split(params)[1]
        if adapters is None:
            return None
        if self.lora is None:
            raise ValueError("the params hold LoRA adapters but the model has no LoRA spec (LanguageModel.lora)")
        return self.lora, adapters

    def merged(self, params: dict, dtype: Any = None) -> dict:
        """``params`` as ordinary parameters: LoRA adapters merged into their weights (float32, or ``dtype``);
        params without adapters are returned as they are. For what needs every weight as one array (the
        quantization and relearning attacks, export)."""
        adapters = self.adapters(params)
        return params if adapters is None else lora_lib.merge(adapters[0], params, dtype)

    def hidden_states(self, params: dict, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states ``[batch, length, embed]`` in the compute dtype."""
        return self.bind(params).hidden_states(tokens, mask, lora=self.adapters(params))

    def residual_stream(self, params: dict, tokens: jax.Array, mask: jax.Array | None, layers: int) -> jax.Array:
        """The residual stream ``[batch, length, embed]`` after the first ``layers`` decoder layers (no final
        norm; only those layers run): transformers' ``output_hidden_states[layers]``."""
        return self.bind(params).hidden_states(tokens, mask, upto=layers, lora=self.adapters(params))

    def head(self, params: dict) -> jax.Array:
        """The ``[embed, vocab]`` output projection."""
        return self.bind(params).head_kernel()

    def logits(self, params: dict, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """fp32 logits ``[batch, length, vocab]``."""
        module = self.bind(params)
        return module.logits(module.hidden_states(tokens, mask, lora=self.adapters(params)))

    def with_dtype(self, dtype: str) -> LanguageModel:
        """The same model computing in ``dtype`` (e.g. ``"float32"`` to evaluate a bf16-compute model exactly).

        The parameter structure, and so the params dict, is unchanged; only the compute dtype differs.
        """
        config = self.config.replace(dtype=dtype)
        graphdef, _ = nnx.split(abstract_model(config), nnx.Param)
        return LanguageModel(graphdef, config, self.lora)

    def with_lora(self, spec: lora_lib.LoraSpec | None) -> LanguageModel:
        """The same model, reading LoRA adapters ``spec`` describes from its params."""
        return dataclasses.replace(self, lora=spec)


def split_model(model: nnx.Module) -> tuple[LanguageModel, dict]:
    """``(structure, params)`` with ``params`` a nested dict of (sharded) arrays."""
    graphdef, state = nnx.split(model, nnx.Param)
    return LanguageModel(graphdef, model.config), state.to_pure_dict()


def param_shardings(config: ModelConfig, mesh: Mesh, rules=None) -> dict:
    """``NamedSharding`` of every parameter, as a dict shaped like :func:`split_model`'s params."""
    _, abs_state = nnx.split(abstract_model(config), nnx.Param)
    return sharding.param_shardings(abs_state, mesh, rules).to_pure_dict()


def check_config(model: Any) -> None:
    """The ``model`` section: a checkpoint to load and the dtypes it is held and computed in."""
    check_rules(
        model,
        "config.model",
        {
            "path": (bool, "give a local Hugging Face directory or a Hub id"),
            "param_dtype": DTYPE,
            "dtype": DTYPE,
            "reference_dtype": DTYPE_OR_DEFAULT,
            "remat": (lambda v: v in REMAT_POLICIES, f"one of {REMAT_POLICIES}"),
            "attention_impl": (lambda v: v in ATTENTION_IMPLS, f"one of {ATTENTION_IMPLS}"),
        },
    )
