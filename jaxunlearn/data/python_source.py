"""Text every Python install has, as a data split: module source code and the language reference.

``path`` forms (``name``, ``split`` and ``column`` do not apply):

- ``python:modules:NAME[,NAME...]``: the source of each named module, one document per file, in the order given;
  a package gives every ``.py`` file under it in sorted order, tests excluded (``test``/``tests`` directories and
  ``test_*.py``). Names are found on ``sys.path`` without importing anything, so ``python:modules:bisect,heapq``
  reads the standard library of the running interpreter and ``python:modules:jaxunlearn`` this package.
- ``python:topics``: the language reference's topics (``pydoc_data.topics``, what ``help("if")`` prints), one
  document per topic, by name: English prose about Python.

Either form may end in a Python slice of its documents, e.g. ``python:topics[::2]`` (every other topic) and
``python:topics[1::2]`` (the rest).

The documents depend on the Python version (the standard library changes between releases); the chunk cache is
keyed by their content, and a run records the split as given.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path

from jaxunlearn.common.settings import parse_list

PREFIX = "python:"
MODULES = "modules:"
TOPICS = "topics"
# Directories and files that hold tests, not the library itself.
_SLICE = re.compile(r"^(?P<body>.*)\[(?P<start>-?\d*):(?P<stop>-?\d*)(?::(?P<step>-?\d*))?\]$")
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"})


def is_python_path(path: str) -> bool:
    """Whether a data path names Python's own text (``python:...``)."""
    return path.strip().startswith(PREFIX)


def is_test_path(relative: Path) -> bool:
    """Whether a path relative to a library root is test code (a test directory or a ``test_*`` file)."""
    return any(part in EXCLUDED_DIRS or part.startswith("test_") for part in relative.parts)


def module_files(name: str) -> list[Path]:
    """The source files of module or package ``name`` (dotted names allowed), found without importing it.

    Raises ``ValueError`` naming a module that is not on ``sys.path`` or has no Python source.
    """
    top, *parts = name.split(".")
    # Source files on sys.path first (the standard library's frozen modules, such as abc or os, have theirs there),
    # then the import system's other finders (editable installs); nothing is imported. Submodules are looked up in
    # their parent's directories, so no package's __init__ runs either.
    spec = importlib.machinery.PathFinder.find_spec(top) if top.isidentifier() else None
    if spec is None and top.isidentifier():
        spec = importlib.util.find_spec(top)
    for part in parts:
        search = list(spec.submodule_search_locations or []) if spec is not None else []
        spec = importlib.machinery.PathFinder.find_spec(part, search) if search else None
    if spec is None:
        raise ValueError(f"module {name!r} has no source on sys.path (not installed, or built into Python)")
    if spec.submodule_search_locations:  # a package: every non-test .py file under it
        roots = [Path(p) for p in spec.submodule_search_locations]
        return [f for root in roots for f in sorted(root.rglob("*.py")) if not is_test_path(f.relative_to(root))]
    if not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"module {name!r} has no Python source ({spec.origin})")
    return [Path(spec.origin)]


def topic_documents(unique: bool = True) -> list[tuple[str, str]]:
    """``(topic, text)`` for each non-empty topic of the language reference, sorted by name; ``unique``: each
    text once (some topics are aliases of one text), so that slices never share a document."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    kept = []
    for name in sorted(topics):
        if topics[name].strip() and not (unique and topics[name] in seen):
            seen.add(topics[name])
            kept.append((name, topics[name]))
    return kept


def documents(path: str) -> list[str]:
    """The documents a ``python:`` path names (``ValueError`` with the reason when it names none)."""
    what = path.strip()[len(PREFIX) :]
    sliced = _SLICE.match(what)
    if sliced:
        bounds = [int(sliced.group(k)) if sliced.group(k) else None for k in ("start", "stop", "step")]
        if bounds[2] == 0:
            raise ValueError("a slice step cannot be zero")
        return documents(PREFIX + sliced.group("body"))[slice(*bounds)]
    if what == TOPICS:
        return [text for _, text in topic_documents()]
    if not what.startswith(MODULES):
        raise ValueError(f"write python:{MODULES}NAME[,NAME...] or python:{TOPICS}")
    names = parse_list(what[len(MODULES) :])
    if not names:
        raise ValueError(f"python:{MODULES} names no module")
    files = [f for name in names for f in module_files(name)]
    return [f.read_text(encoding="utf-8") for f in files]
