"""The package's import graph: no cycles, and imports only point down the layers of docs/architecture.md.

Every import counts, function-level ones included; only ``if TYPE_CHECKING:`` blocks are exempt. ``from pkg import
name`` is an edge to ``pkg`` (its ``__init__`` runs) and to ``pkg.name`` when that is a module; ``import
pkg.mod as m`` is an edge to ``pkg.mod``.
The graph is read from the source with :mod:`ast`, independently of the package's own code.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxunlearn"

# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = (
    ("leaves", ("jaxunlearn", "jaxunlearn.errors", "jaxunlearn.common")),
    (
        "owners",
        (
            "jaxunlearn.storage",
            "jaxunlearn.parallel",
            "jaxunlearn.models",
            "jaxunlearn.data",
            "jaxunlearn.methods",
            "jaxunlearn.training",
            "jaxunlearn.evaluation",
            "jaxunlearn.attacks",
            "jaxunlearn.world",
        ),
    ),
    ("config", ("jaxunlearn.config",)),
    ("run", ("jaxunlearn.run", "jaxunlearn.planning")),
    ("experiments", ("jaxunlearn.experiments",)),
    ("commands", ("jaxunlearn.commands", "jaxunlearn.main")),
)


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for statement in node.body for n in ast.walk(statement))
    return skip


def _targets(node: ast.AST, package: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    # `from pkg import submodule` runs pkg/__init__.py too: an edge to both
    return [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules] + [base]


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """``{module: {jaxunlearn modules it imports}}``."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for target in _targets(node, package, modules):
                while target and target not in modules:  # `import a.b.c` names a module or its attribute
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def layer(module: str) -> int:
    best = None
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    assert best is not None, f"{module} is in no layer: add its package to LAYERS (and docs/architecture.md)"
    return best[0]


def test_the_cycle_finder_finds_cycles():
    """The check below can fail: a hand-made graph with two cycles and a chain."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "a"}, "f": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_lazy_relative_and_submodule_imports():
    graph = import_graph()
    # a function-level import (the unlearning command imports the engine when it runs, after the CPU set-up)
    assert "jaxunlearn.run.engine" in graph["jaxunlearn.commands.unlearn"]
    # `from jaxunlearn.parallel import sharding` is an edge to the submodule and to its package
    assert {"jaxunlearn.parallel.sharding", "jaxunlearn.parallel"} <= graph["jaxunlearn.models"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(module_names()))
def test_imports_point_down_the_layers(module):
    graph = import_graph()
    upward = [
        f"{target} ({LAYERS[layer(target)][0]})" for target in sorted(graph[module]) if layer(target) > layer(module)
    ]
    assert not upward, f"{module} ({LAYERS[layer(module)][0]}) imports a layer above it: {', '.join(upward)}"


def test_each_config_section_is_checked_by_its_owner():
    """The base config's sections are exactly those with an owner (or the generic keys), and no owner lives in
    the config package: adding a section means adding its owner's check."""
    from jaxunlearn.config import base_config
    from jaxunlearn.config.validation import SECTION_OWNERS

    sections = {k for k, v in base_config("ga").items() if hasattr(v, "items")}
    assert sections == set(SECTION_OWNERS)
    for section, check in SECTION_OWNERS.items():
        assert not check.__module__.startswith("jaxunlearn.config"), (section, check.__module__)
