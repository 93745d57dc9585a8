"""Validation of a whole config, before any work: the generic checks (every key known and present, of its default's
type, every float finite, every place reachable), then each section by the part that owns it, then the few rules
that span sections. Every error names the offending key (:class:`~jaxunlearn.errors.ConfigError`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxunlearn import models
from jaxunlearn.common.settings import flatten, parse_list
from jaxunlearn.config.base import base_config
from jaxunlearn.data import settings as data_settings
from jaxunlearn.errors import ConfigError, require
from jaxunlearn.evaluation import settings as evaluation_settings
from jaxunlearn.methods import registry as methods
from jaxunlearn.models import lora
from jaxunlearn.parallel import sharding
from jaxunlearn.storage import checkpoints, locations
from jaxunlearn.training import step
from jaxunlearn.world import build

# Each section and the part that checks it (Levanter's components validate their own configs).
SECTION_OWNERS: dict[str, Callable[[Any], None]] = {
    "method": methods.check_config,
    "model": models.check_config,
    "lora": lora.check_config,
    "mesh": sharding.check_config,
    "data": data_settings.check_config,
    "optim": step.check_optim_config,
    "train": step.check_train_config,
    "checkpoint": checkpoints.check_config,
    "evaluation": evaluation_settings.check_config,
    "world": build.check_config,
}
# Settings that name a place: a local path, a Hub id, a ``world:`` name or a storage URL (gs://, file://, ...).
LOCATION_KEYS = ("path", "tokenizer", "oracle_model", "cache_dir", "tfds_data_dir")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`~jaxunlearn.errors.ConfigError` naming the first unknown key or bad value."""
    if "method" not in config or "name" not in config.method:
        raise ConfigError("config.method.name is missing")
    name = config.method.name
    known = methods.METHODS
    require(name in known, "config.method.name", name, f"unknown method; known: {', '.join(sorted(known))}")
    given = flatten(config, "config")
    check_keys_and_types(given, flatten(base_config(name), "config"))
    require(config.seed >= 0, "config.seed", config.seed, ">= 0 (it seeds NumPy's generators)")  # no section owns it
    for section, check in SECTION_OWNERS.items():
        check(config[section])
    check_across_sections(config)
    check_locations(given)


def check_keys_and_types(given: dict[str, Any], reference: dict[str, Any]) -> None:
    """Every key known and present, of its default's type; every float finite (``inf`` and ``nan`` parse)."""
    for key in sorted(set(given) - set(reference)):
        raise ConfigError(f"{key}: unknown config key")
    for key in sorted(set(reference) - set(given)):
        raise ConfigError(f"{key}: missing config key")
    for key, value in given.items():
        expected = type(reference[key])
        # bool is a subclass of int: True is no count (and no float) unless the default is a bool.
        ok = (isinstance(value, expected) and (expected is bool or not isinstance(value, bool))) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool)
        )
        require(ok, key, value, f"must be a {expected.__name__}")
        if isinstance(value, float):
            require(math.isfinite(value), key, value, "must be a finite number")


def check_locations(given: dict[str, Any]) -> None:
    """A URL that cannot work (unsupported scheme, malformed, no storage client) is refused before any work."""
    for key, value in given.items():
        if key.rsplit(".", 1)[-1] in LOCATION_KEYS and isinstance(value, str):
            try:
                locations.check(value, key)
            except locations.LocationError as e:
                raise ConfigError(str(e)) from None


def check_across_sections(config: ml_collections.ConfigDict) -> None:
    """What one section asks of another: the data a method or a metric needs, the built-in oracle's model."""
    _check_method_data(config)
    _check_attacks(config)
    e = config.evaluation
    if not e.enabled:
        return
    if e.stop_approx_multiple:
        path = config.data.approximate.path
        require(bool(path), "config.data.approximate.path", path, "stop_approx_multiple needs the approximate split")
    if e.oracle_model.startswith("world:") and not config.model.path.startswith("world:"):
        raise ConfigError(
            f"config.model.path={config.model.path!r} with the built-in world's oracle "
            f"(config.evaluation.oracle_model={e.oracle_model!r}), which is a retrain of the built-in target only: "
            "for your own model use the paper's presets (e.g. --config=configs/ga_kl.py:arxiv, :github or :books), "
            "or set "
            "--config.evaluation.oracle_model to a model retrained without the forget set (or '' for none)"
        )


def _check_method_data(config: ml_collections.ConfigDict) -> None:
    """A method that needs retain data (under its hyper-parameters) has it; a cap derived from the approximate
    split has that split and the evaluation that measures it; a second forget topic is for a method with
    per-topic hyper-parameters."""
    margin = config.method.get("forget_nll_cap_margin", 0.0)
    if margin:
        key = "config.method.forget_nll_cap_margin"
        needs = "derives the cap from the original's perplexity on the approximate split, so it needs"
        require(config.evaluation.enabled, key, margin, f"{needs} config.evaluation.enabled=True")
        require(bool(config.data.approximate.path), key, margin, f"{needs} config.data.approximate.path")
    forget2 = config.data.forget2.path
    if forget2:
        name = config.method.name
        require(
            methods.get_method(name).topics,
            "config.data.forget2.path",
            forget2,
            f"method {name} has one forget term; a second forget topic needs per-topic hyper-parameters, which "
            f"only {', '.join(sorted(n for n, m in methods.METHODS.items() if m.topics))} has",
        )
    if methods.resolve_needs(config.method).retain:
        hparams = ", ".join(f"{k}={v}" for k, v in methods.method_hparams(config.method).items())
        require(
            bool(config.data.retain.path),
            "config.data.retain.path",
            config.data.retain.path,
            f"method {config.method.name} ({hparams}) trains a retain term and needs a retain set",
        )


def _check_attacks(config: ml_collections.ConfigDict) -> None:
    """A relearning attack that is on has its metric listed and the splits it reads."""
    e = config.evaluation
    relearn = parse_list(evaluation_settings.metric_options(e, "relearning")["corpora"])
    if not relearn or not e.enabled:
        return
    require(
        "relearning" in e.metrics,
        "config.evaluation.metrics",
        e.metrics,
        "the relearning attack is on (evaluation.attacks or relearning.corpora) but 'relearning' is not listed",
    )
    require(bool(config.data.approximate.path), "config.data.approximate.path", "", "relearning measures the AUC on it")
    if "retain" in relearn:
        path = config.data.eval_retain.path or config.data.retain.path
        require(bool(path), "config.data.retain.path", path, "relearning on related text reads the retain split")
