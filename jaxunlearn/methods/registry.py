"""The method registry: what a method is (its loss, hyper-parameters, needs, trainable parameters and transform),
how it registers, and the ``method`` config section's own checks.

A method declares what it reads as a function of its hyper-parameters (``register(..., needs=...)``): e.g. NPO
reads retain chunks only with ``retain_weight > 0``. Data preparation, the train step and the compute
accounting all follow that one answer, so a term is never silently dropped for lack of data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxunlearn.errors import require

Array = jax.Array
Split = Mapping[str, Array]
Objective = Callable[..., tuple[Array, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class Needs:
    """What one run of a method reads, decided from its resolved hyper-parameters.

    Data preparation (which splits to load), the train step (which arrays it receives) and the compute
    accounting (how many forward passes a step costs) all read this one answer.
    """

    retain: bool = False  # retain chunks in every step (as many as forget chunks)
    reference: bool = False  # the frozen original model
    reference_forwards: int = 0  # reference-model forward passes per forget chunk of a step
    extras: frozenset[str] = frozenset()  # run constants from EXTRAS, e.g. "label_ids"


# ``trainable(hparams, model_config)``: which parameters the optimizer updates, as a tree shaped like the params
# whose leaves broadcast against them (``[layers, 1, ...]`` for stacked layers), 1.0 = trained, 0.0 = frozen.
Trainable = Callable[[Mapping[str, Any], Any], dict]
# ``transform(params, ref_params, hparams)``: the unlearned model as a function of the trained parameters and the
# frozen original (task vectors: the original minus the scaled fine-tuning difference).
Transform = Callable[[dict, dict, Mapping[str, Any]], dict]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: Objective
    hparams: Mapping[str, Any]  # defaults, overridable as config.method.<name>
    needs_rule: Callable[[Mapping[str, Any]], Needs]  # register(needs=...) as a function of the hyper-parameters
    summary: str
    trainable: Trainable | None = None  # None: every parameter is trained
    transform: Transform | None = None  # None: the trained parameters are the unlearned model
    # ``check(hparams, model_config)`` raises ValueError for hyper-parameters that cannot work on this model
    # (e.g. a layer it does not have); called before any compute.
    check: Callable[[Mapping[str, Any], Any], None] | None = None
    # Reads each forget batch's ``topic`` (0 or 1) and has per-topic hyper-parameters: may train on two forget
    # topics (``data.forget2``). Every other method refuses a second topic.
    topics: bool = False

    def needs(self, hparams: Mapping[str, Any] | None = None) -> Needs:
        """This method's inputs under ``hparams`` (the defaults merged with the given values)."""
        return self.needs_rule({**self.hparams, **(hparams or {})})


METHODS: dict[str, Method] = {}


def register(
    name: str,
    *,
    needs: Needs | Callable[[Mapping[str, Any]], Needs] = Needs(),
    trainable: Trainable | None = None,
    transform: Transform | None = None,
    check: Callable[[Mapping[str, Any], Any], None] | None = None,
    topics: bool = False,
    **hparams: Any,
):
    """Register an objective under ``name`` with its default hyper-parameters (overridable in config).

    ``needs`` is a :class:`Needs` or a function of the hyper-parameters returning one; ``trainable``,
    ``transform``, ``check`` and ``topics`` are the optional parts of :class:`Method`.
    """

    def needs_rule(hp: Mapping[str, Any]) -> Needs:
        return needs(hp) if callable(needs) else needs

    def decorate(fn: Objective) -> Objective:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, fn, dict(hparams), needs_rule, summary, trainable, transform, check, topics)
        return fn

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown unlearning method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_hparams(method_config: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters of a ``config.method`` section (everything but ``name``), defaults filled in."""
    method = get_method(method_config["name"])
    return {**method.hparams, **{k: v for k, v in method_config.items() if k != "name"}}


def resolve_needs(method_config: Mapping[str, Any]) -> Needs:
    """What the method of a ``config.method`` section needs under its hyper-parameters."""
    return get_method(method_config["name"]).needs(method_hparams(method_config))


def check_config(method: Mapping[str, Any]) -> None:
    """The ``method`` section: a known method with non-negative hyper-parameters (the forget-NLL cap given once).
    Whether the data the method needs is there is a question across sections (:mod:`jaxunlearn.config.validation`)."""
    name = method["name"]
    require(name in METHODS, "config.method.name", name, f"unknown method; known: {', '.join(sorted(METHODS))}")
    for hp, value in method.items():
        if hp != "name" and isinstance(value, (int, float)):
            require(value >= 0, f"config.method.{hp}", value, "must be >= 0")
    margin = method.get("forget_nll_cap_margin", 0.0)
    if margin:
        key = "config.method.forget_nll_cap_margin"
        require(not method["forget_nll_cap"], key, margin, "give forget_nll_cap or its margin, not both")
