"""The import-layers contract of ARCHITECTURE.md: models <- workers -> service."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "models": {"service", "workers"},
    "service": {"workers", "models"},
}
# The serving path must not need torch: only training/export and the PyTorch backend may import it.
TORCH_ALLOWED = {"models/families", "models/training"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upwards(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _imports(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_serving_path_does_not_import_torch() -> None:
    offenders = []
    for package in ("service", "workers", "models"):
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if any(relative == allowed or relative.startswith(allowed + "/") for allowed in TORCH_ALLOWED):
                continue
            if {"torch", "monai"} & _imports(path):
                offenders.append(relative)
    assert offenders == []
