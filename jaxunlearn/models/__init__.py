"""Model families and sharded construction.

Every supported Hugging Face ``model_type`` maps to one architecture module exposing ``Transformer`` (an NNX
module) and ``hf_tensors(config)`` (the checkpoint name table). Adding a family means adding one such module
and one line in ``FAMILIES``.
"""

from __future__ import annotations

from types import ModuleType

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxunlearn import sharding
from jaxunlearn.models import llama
from jaxunlearn.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError

FAMILIES: dict[str, ModuleType] = {"llama": llama, "mistral": llama, "qwen2": llama}
assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)

__all__ = [
    "FAMILIES",
    "ModelConfig",
    "UnsupportedModelError",
    "abstract_model",
    "family",
    "init_model",
]


def family(config: ModelConfig) -> ModuleType:
    """The architecture module implementing ``config.model_type``."""
    return FAMILIES[config.model_type]


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes, dtypes and axes without allocating anything."""
    return nnx.eval_shape(lambda: family(config).Transformer(config, rngs=nnx.Rngs(0)))


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
        state = nnx.state(family(config).Transformer(config, rngs=nnx.Rngs(seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, create())
