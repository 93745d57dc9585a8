"""Shared command-line plumbing: one-line errors (exit status 2) instead of tracebacks."""

from __future__ import annotations

import re
import sys
from typing import Any, NoReturn

from absl import flags


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"jaxunlearn: error: {message}", file=sys.stderr)
    sys.exit(code)


def _last_line(text: str) -> str:
    """The exception line at the end of an embedded traceback, without its class path."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors instead of tracebacks (unknown keys, bad values, bad presets)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if "Traceback" in text:  # ml_collections embeds the config file's traceback in the message
            flag = re.match(r"flag (--\S+):", text)
            fail(f"{flag.group(1) if flag else '--config'}: {_last_line(text)}")
        fail(text)
    except (AttributeError, KeyError) as e:  # ml_collections: unknown key in a --config.* override
        text = str(e).replace("\\n", " ").replace("\\'", "'").strip("'\" ")
        key = re.match(r"'?(\w+)'?", text)
        culprit = next(
            (a.split("=")[0] for a in argv if key and a.startswith("--config.") and key.group(1) in a.split("=")[0]),
            None,
        )
        fail(f"{culprit or 'a --config override'}: unknown config key ({text})")
    except Exception as e:  # a config file that does not import, ...
        fail(f"{type(e).__name__}: {e}")


def loaded_config(holder: Any, name: str = "config") -> Any:
    """The value of a ``DEFINE_config_file`` flag, or a one-line error when it is missing or failed to load
    (ml_collections defers a missing file's error to the first use of the config)."""
    value = holder.value
    if value is None:
        fail(f"--{name}=CONFIG_FILE is required (e.g. --{name}=configs/ga_kl.py)")
    try:
        value.get("seed")  # a config that failed to load raises on any access
    except OSError as e:
        from ml_collections import config_flags

        path = config_flags.get_config_filename(flags.FLAGS[name])
        fail(f"--{name}={path}: cannot load it ({_last_line(str(e.__cause__ or e))})")
    return value


def refusals() -> tuple[type[BaseException], ...]:
    """The errors that mean "bad input": reported in one line naming the culprit, exit status 2."""
    from jaxunlearn.config import ConfigError
    from jaxunlearn.data import DataError
    from jaxunlearn.hf_checkpoint import CheckpointError
    from jaxunlearn.models import UnsupportedModelError
    from jaxunlearn.sharding import MeshError
    from jaxunlearn.workdir import WorkdirError

    return (ConfigError, DataError, CheckpointError, MeshError, UnsupportedModelError, WorkdirError)
