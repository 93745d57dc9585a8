"""The compared variants: each a shipped config, built for the preset, with the command line's overrides and a
scaled learning rate."""

from __future__ import annotations

import importlib.util
from typing import Any

from jaxunlearn.common.settings import flatten, set_dotted
from jaxunlearn.config import base_config
from jaxunlearn.config.files import config_files

RETAIN = "data.retain."
VARIANTS = ("ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general")  # the paper's


def variant_config(name: str, preset: str, overrides: dict[str, Any], lr_multiplier: float):
    """The shipped config ``name`` for ``preset``, with ``overrides`` applied and its learning rate scaled."""
    path = config_files()[name]
    spec = importlib.util.spec_from_file_location(f"jaxunlearn_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    # the preset's own retain split (not general text, as the *_general variants retain on): given paths apply
    in_domain = config.data.retain.to_dict() == base_config(config.method.name, preset=preset).data.retain.to_dict()
    for key, value in overrides.items():
        if key.startswith("method.") and key.split(".", 1)[1] not in config.method:
            continue  # a hyper-parameter of another method (e.g. beta for the GA variants)
        if key.startswith(RETAIN) and not in_domain:
            continue
        set_dotted(config, key, value)
    config.optim.lr = float(config.optim.lr * lr_multiplier)
    return config


def command_line_overrides(config, preset: str, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fields of ``config`` that differ from its method's base defaults, and the ``explicit`` command-line
    overrides (``--config.KEY=VALUE``, even when equal to the base config's default: ``retain_weight=1`` must reach
    a method whose own default is 0); method name and lr excluded. The retain split only as given explicitly (a
    local copy of the preset's retain data), which :func:`variant_config` applies to the in-domain variants."""
    default = flatten(base_config(config.method.name, preset=preset).to_dict())
    given = flatten(config.to_dict())
    skip = ("method.name", "optim.lr")
    differ = [k for k, v in given.items() if default.get(k) != v and not k.startswith(RETAIN)]
    keys = differ + [k for k in explicit or {} if k in given]
    return {k: given[k] for k in dict.fromkeys(keys) if not k.startswith(skip)}
