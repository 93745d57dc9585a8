"""The configuration error every part raises when its own settings cannot work (a leaf: imports nothing of ours).

Each part of jaxunlearn checks its own config section (``check_config``) and raises :class:`ConfigError` with a
message that starts with the offending key, so that the command line can name the culprit in one line.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the key."""


def require(condition: bool, key: str, value: Any, requirement: str) -> None:
    """Raise ``ConfigError("key=value: requirement")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {requirement}")


def check_rules(section: Any, prefix: str, rules: dict[str, tuple[Any, str]]) -> None:
    """One-value checks of a config section: ``{key: (predicate, requirement)}``, keys relative to ``prefix``."""
    for key, (check, requirement) in rules.items():
        value = section
        for part in key.split("."):
            value = value[part]
        require(check(value), f"{prefix}.{key}", value, requirement)


AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "must be > 0")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE = (lambda v: v in DTYPES, f"one of {DTYPES}")
DTYPE_OR_DEFAULT = (lambda v: v in DTYPES + ("",), f"one of {DTYPES} or ''")
