"""Shared command-line plumbing: one-line errors instead of tracebacks."""

from __future__ import annotations

import re
import sys

from absl import flags


def fail(message: str, code: int = 2) -> None:
    print(f"jaxunlearn: error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors instead of tracebacks (unknown keys, bad values)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
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
    raise AssertionError("unreachable")
