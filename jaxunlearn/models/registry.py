"""Model families: one object per Hugging Face ``model_type``, found through a registry.

A family owns everything that differs between architectures: reading and writing its ``config.json``, its
parameter and FLOP counts, the table mapping its parameters to Hugging Face tensors, building its NNX module,
and creating its KV cache for generation. :class:`~jaxunlearn.models.spec.ModelConfig` stays one shared
dataclass and delegates to ``get_family(config.model_type)``.

Adding a family is one module defining a :class:`Family` subclass decorated with :func:`register_family`, plus
the import line in ``jaxunlearn/models/__init__.py`` that registers it (the pattern of Levanter's
``LmConfig.register_subclass``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from flax import nnx

    from jaxunlearn.models.layouts import HFTensor
    from jaxunlearn.models.spec import ModelConfig


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture jaxunlearn does not implement."""


class Family:
    """Base class of a model family. Subclasses set ``model_type`` and ``architecture`` and implement the hooks.

    Families are stateless singletons: every method takes the :class:`ModelConfig` it works on.
    """

    # The ``model_type`` of config.json this family reads, and the transformers class written on export.
    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""

    # --- config.json ---------------------------------------------------------------------------------------

    def config_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """:class:`ModelConfig` fields read from a ``config.json`` dict of this family (numerics excluded)."""
        raise NotImplementedError

    def config_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        """The ``config.json`` keys that describe ``config``; they update the source checkpoint's config."""
        raise NotImplementedError

    # --- sizes -----------------------------------------------------------------------------------------------

    def num_params(self, config: ModelConfig) -> int:
        """Number of parameters (embedding and head counted separately unless tied)."""
        raise NotImplementedError

    def matmul_params(self, config: ModelConfig) -> int:
        """Parameters used in matmuls: everything except the embedding lookup (a tied head still multiplies)."""
        embedding = config.vocab_size * config.hidden_size
        head = 0 if not config.tie_word_embeddings else embedding
        return self.num_params(config) - embedding + head

    def forward_flops_per_token(self, config: ModelConfig, seq_len: int) -> float:
        """Model FLOPs of one token's forward pass: ``2 N`` plus causal attention (Kaplan et al. 2020)."""
        attention = 2 * config.num_layers * seq_len * config.num_heads * config.head_dim
        return 2.0 * self.matmul_params(config) + attention

    # --- weights, modules, generation ------------------------------------------------------------------------

    def hf_tensors(self, config: ModelConfig) -> list[HFTensor]:
        """The complete parameter <-> Hugging Face tensor table for ``config``."""
        raise NotImplementedError

    def ignored_hf_tensor(self, config: ModelConfig, name: str) -> bool:
        """Whether a checkpoint tensor outside :meth:`hf_tensors` may be skipped (e.g. recomputed buffers)."""
        return False

    def module(self, config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
        """The NNX model, its parameters initialised from ``rngs``."""
        raise NotImplementedError

    def init_cache(self, config: ModelConfig, batch: int, slots: int, dtype: Any = None) -> Any:
        """An empty KV cache of ``slots`` positions for ``batch`` sequences (a pytree of arrays)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r})"


_FAMILIES: dict[str, Family] = {}
F = TypeVar("F", bound=type[Family])


def register_family(cls: F) -> F:
    """Class decorator: register an instance of ``cls`` under ``cls.model_type``.

    Registering another class for a taken ``model_type`` is an error (re-registering the same class, e.g. when
    its module is reloaded, replaces it).
    """
    if not cls.model_type or not cls.architecture:
        raise ValueError(f"{cls.__qualname__} must set model_type and architecture")
    current = _FAMILIES.get(cls.model_type)
    if current is not None and type(current).__qualname__ != cls.__qualname__:
        raise ValueError(f"model_type {cls.model_type!r} is already registered by {type(current).__qualname__}")
    _FAMILIES[cls.model_type] = cls()
    return cls


def supported_model_types() -> tuple[str, ...]:
    """The registered ``model_type`` names, in registration order."""
    return tuple(_FAMILIES)


def get_family(model_type: str | None, *, remote_code: bool = False) -> Family:
    """The family registered for ``model_type``; :class:`UnsupportedModelError` listing the supported ones.

    ``remote_code`` (the config has ``auto_map``) adds that custom modelling code is never run.
    """
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is not None:
        return family
    hint = " (it asks for custom code via auto_map; jaxunlearn never runs remote code)" if remote_code else ""
    architectures = ", ".join(f.architecture for f in _FAMILIES.values())
    raise UnsupportedModelError(
        f"model_type {model_type!r}{hint} is not supported; supported model types: "
        f"{', '.join(supported_model_types())} (architectures {architectures})"
    )


def required(hf: Mapping[str, Any], key: str) -> Any:
    """``hf[key]``, or :class:`UnsupportedModelError` naming the missing ``config.json`` key."""
    if key not in hf or hf[key] is None:
        raise UnsupportedModelError(
            f"config.json (model_type {hf.get('model_type')!r}) has no {key!r}; it is required to build the model"
        )
    return hf[key]
