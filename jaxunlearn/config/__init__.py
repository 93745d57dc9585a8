"""Configuration: the one base every ``configs/*.py`` file is composed from, and its validation.

- :mod:`~jaxunlearn.config.base`: each section's defaults (:func:`base_config`);
- :mod:`~jaxunlearn.config.builtin`: the built-in world's paths and tuned hyper-parameters;
- :mod:`~jaxunlearn.config.presets` and :mod:`~jaxunlearn.config.sources`: the benchmarks' and the paper's data;
- :mod:`~jaxunlearn.config.validation`: the generic checks, each section checked by its owner, the cross-section
  rules (:func:`validate`).
"""

from jaxunlearn.config.base import PRESETS, base_config, method_config
from jaxunlearn.config.sources import BOOKS_SPLITS, PAPER_DATASET, split_config
from jaxunlearn.config.validation import validate
from jaxunlearn.errors import ConfigError

__all__ = [
    "BOOKS_SPLITS",
    "PAPER_DATASET",
    "PRESETS",
    "ConfigError",
    "base_config",
    "method_config",
    "split_config",
    "validate",
]
