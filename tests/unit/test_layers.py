"""The import-layers contract of docs/architecture.md: service <- workers -> models, and the rooms of models.

Every import statement counts, at module level or inside a function: a
local import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "workers", "models")
# Package -> the top-level packages it must never import.
FORBIDDEN = {
    "models": {"service", "workers"},
    "service": {"workers", "models"},
}
# The rooms of models/, and which rooms each may import (a DAG: inference <- families <- evaluation <- training).
# Shared leaves at models/ top level (errors, datasets) may be imported by every room.
ROOMS = ("inference", "families", "training", "evaluation")
ROOM_MAY_IMPORT = {
    "inference": set(),
    "families": {"inference"},
    "evaluation": {"inference", "families"},
    "training": {"inference", "families", "evaluation"},
}
# workers turns jobs into results with what serving needs: models.inference (and the error tree). Only the command
# line, the composition root, reaches the other rooms (evaluate, train).
WORKERS_MAY_IMPORT_FROM_MODELS = ("models.inference", "models.errors")
WORKERS_COMPOSITION_ROOT = "workers.cli"
# The serving path must not need torch: only the families' networks and training may import it.
TORCH_ALLOWED = ("models/families", "models/training")


def _modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imported_names(path: Path) -> Iterator[str]:
    """Dotted names of everything ``path`` imports, with ``from a import b`` giving ``a.b`` where that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    yield f"{node.module}.{alias.name}"


def _top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imported_names(path)}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "models" and parts[1] in ROOMS else None


@functools.cache
def _project_graph() -> dict[str, frozenset[str]]:
    """Module -> the project modules it imports (a package import counts as importing its __init__).

    Parsed once for all the tests: the sets are frozen, build a new mapping to change it.
    """
    graph: dict[str, frozenset[str]] = {}
    for module, path in MODULES.items():
        targets = set()
        for name in _imported_names(path):
            # the longest project module the name starts with: models.inference.registry.X -> models.inference.registry
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in MODULES:
                    targets.add(candidate)
                    break
        targets.discard(module)
        graph[module] = frozenset(targets)
    return graph


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upwards(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_top_levels(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _top_levels(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_no_relative_imports() -> None:
    # The rules below read absolute module names; a relative import would pass them unseen.
    offenders = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(node, ast.ImportFrom) and node.level > 0 for node in ast.walk(tree)):
            offenders.append(module)
    assert offenders == []


def test_workers_use_only_the_serving_room_of_models() -> None:
    offenders = []
    for module, targets in _project_graph().items():
        if not module.startswith("workers.") or module == WORKERS_COMPOSITION_ROOT:
            continue
        for target in targets:
            if target.startswith("models") and not target.startswith(WORKERS_MAY_IMPORT_FROM_MODELS):
                offenders.append(f"{module} -> {target}")
    assert offenders == []


def test_rooms_of_models_import_only_downwards() -> None:
    offenders = []
    for module, targets in _project_graph().items():
        room = _room(module)
        if room is None:
            continue
        for target in targets:
            other = _room(target)
            if other is not None and other != room and other not in ROOM_MAY_IMPORT[room]:
                offenders.append(f"{module} -> {target}")
    assert offenders == []


def test_the_serving_path_does_not_import_torch() -> None:
    offenders = []
    for _module, path in MODULES.items():
        relative = path.relative_to(ROOT).as_posix()
        if any(relative.startswith(allowed + "/") for allowed in TORCH_ALLOWED):
            continue
        if {"torch", "monai"} & _top_levels(path):
            offenders.append(relative)
    assert offenders == []


def _cycles(graph: Mapping[str, Collection[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others() -> None:
    # A package's __init__ importing its own sub-modules is how a package re-exports; a sub-module importing the
    # package back is the cycle that matters, and it still shows through the other edges.
    graph = {
        module: {t for t in targets if not (MODULES[module].name == "__init__.py" and t.startswith(module + "."))}
        for module, targets in _project_graph().items()
    }
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
