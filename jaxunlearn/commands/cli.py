"""Shared command-line plumbing: one-line errors (exit status 2) instead of tracebacks."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

from jaxunlearn.common import interrupts
from jaxunlearn.config.files import config_files

CONFIG_HELP = "A shipped config's name, e.g. ga_kl or ga_kl:arxiv (preset), or a config file (path/to/config.py:arxiv)."


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"jaxunlearn: error: {message}", file=sys.stderr)
    sys.exit(code)


def _last_line(text: str) -> str:
    """The exception line at the end of an embedded traceback, without its class path."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


def _config_path(value: str) -> str:
    """``NAME[:preset]`` -> the shipped file's path (with the preset); a file path is left as it is."""
    name, colon, preset = value.partition(":")
    if not name or Path(name).is_file():
        return value
    if "/" in name or name.endswith(".py"):  # a file that is not there (absl would print a paragraph)
        fail(
            f"--config={value}: cannot load it (No such file or directory: {name!r}); give a config file or a "
            f"shipped config's name ({', '.join(config_files())})"
        )
    shipped = config_files()
    if name not in shipped:
        fail(f"--config={value}: no such file, and no shipped config of that name (shipped: {', '.join(shipped)})")
    return f"{shipped[name]}{colon}{preset}"


def named_configs(argv: list[str]) -> list[str]:
    """``argv`` with ``--config=NAME[:preset]`` and ``--config NAME[:preset]`` pointing at the shipped files."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":  # the end of the flags
            break
        flag, eq, value = arg.partition("=")
        if flag in ("--config", "-config") and eq:
            out[i] = f"{flag}={_config_path(value)}"
        elif arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = _config_path(out[i + 1])
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors instead of tracebacks (unknown keys, bad values, bad presets).
    ``--config`` takes a shipped config's name as well as a file (``--config=ga_kl:arxiv``)."""
    argv = named_configs(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        override = re.match(r"Unknown command line flag '(config\.[^']*)'", text)
        if override and not any(a.split("=")[0] in ("--config", "-config") for a in argv):
            fail(f"--{override.group(1)}: an override needs --config=CONFIG (a shipped config's name or a config file)")
        if "Traceback" in text:  # ml_collections embeds the config file's traceback in the message
            flag = re.match(r"flag (--\S+):", text)
            fail(f"{flag.group(1) if flag else '--config'}: {_last_line(text)}")
        fail(text)
    except (AttributeError, KeyError) as e:  # ml_collections: unknown key in a --config.* override
        text = str(e).replace("\\n", " ").replace("\\'", "'").strip("'\" ")
        if isinstance(e, AttributeError) and "has no attribute 'get_config" in text:  # a file that is no config
            given = next((a.split("=", 1)[1] for a in argv if a.split("=")[0] in ("--config", "-config")), "CONFIG")
            fail(
                f"--config={given}: the file has no get_config() function (a config file defines get_config() "
                "returning an ml_collections.ConfigDict)"
            )
        key = re.match(r"'?(\w+)'?", text)
        culprit = next(
            (a.split("=")[0] for a in argv if key and a.startswith("--config.") and key.group(1) in a.split("=")[0]),
            None,
        )
        fail(f"{culprit or 'a --config override'}: unknown config key ({text})")
    except Exception as e:  # a config file that does not import, ...
        fail(f"{type(e).__name__}: {e}")


def run_command(main: Callable[[list[str], Any], None], module_name: str, define_flags: Callable[[], Any]) -> None:
    """``app.run(main)`` with the flag parsing above; ``main(argv, args)`` gets what ``define_flags()`` returned
    (the flag holders). A command defines its flags here, when it runs, not when its module is imported: the
    commands' modules are also libraries (``evaluate``, ``run_comparison``), and two of them imported into one
    process would otherwise both define ``--config``. Run as a console script (``jaxunlearn-plan``), ``--help`` shows
    the command's docstring and flags as ``python -m`` does (absl documents ``__main__`` and ``sys.argv[0]``).
    SIGINT and SIGTERM end every command with exit status 130 and one line (:mod:`jaxunlearn.common.interrupts`)."""
    interrupts.install()  # first: python -m jaxunlearn.main installs it before importing anything else
    args = define_flags()

    def guarded(argv: list[str]) -> None:  # a refusal raised outside a command's own handlers is one line too
        try:
            main(argv, args=args)
        except refusals() as e:
            fail(str(e))

    module = sys.modules[module_name]
    if sys.modules["__main__"] is not module:
        sys.modules["__main__"].__doc__ = module.__doc__
        for flag in flags.FLAGS.get_key_flags_for_module(module_name):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    try:
        try:
            app.run(guarded, flags_parser=parse_flags)
        finally:
            interrupts.hold()  # the end: a signal from here on is only recorded, and decides the exit status
    except KeyboardInterrupt as e:
        interrupted(e)
    except SystemExit as e:
        if not e.code and interrupts.received():  # a signal is never swallowed: no exit status 0 after one
            interrupted(None)
        raise


def interrupted(error: BaseException | None) -> NoReturn:
    """Exit status 130 with one line naming the signal (after the line that logged it, if it is still due)."""
    interrupts.announce_pending()
    fail(interrupts.exit_message(error), code=130)


def loaded_config(holder: Any, name: str = "config") -> Any:
    """The value of a ``DEFINE_config_file`` flag, or a one-line error when it is missing or failed to load
    (ml_collections defers a missing file's error to the first use of the config)."""
    value = holder.value
    if value is None:
        fail(f"--{name}=CONFIG is required: a config file or a shipped config's name (e.g. --{name}=ga_kl)")
    try:
        value.get("seed")  # a config that failed to load raises on any access
    except OSError as e:
        from ml_collections import config_flags

        path = config_flags.get_config_filename(flags.FLAGS[name])
        fail(f"--{name}={path}: cannot load it ({_last_line(str(e.__cause__ or e))})")
    return value


def refusals() -> tuple[type[BaseException], ...]:
    """The errors that mean "bad input": reported in one line naming the culprit, exit status 2."""
    from jaxunlearn.data import DataError
    from jaxunlearn.errors import ConfigError
    from jaxunlearn.models import UnsupportedModelError
    from jaxunlearn.models.hf_checkpoint import CheckpointError
    from jaxunlearn.parallel.sharding import MeshError
    from jaxunlearn.run.workdir import WorkdirError
    from jaxunlearn.storage.locations import LocationError

    return (ConfigError, DataError, CheckpointError, LocationError, MeshError, UnsupportedModelError, WorkdirError)
