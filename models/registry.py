"""The model registry: which model files exist, what they are, and proof they are intact.

``weights/manifest.json`` lists every reference model with its name,
version, file, sha256 and preprocessing parameters. Loading verifies the
checksum, so a corrupted or swapped file is refused rather than run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.findings import ModelInfo

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"


class ModelRegistryError(Exception):
    """A model is missing, unlisted, or does not match its recorded checksum."""


@dataclass(frozen=True)
class ModelEntry:
    """One model as listed in the manifest."""

    role: str
    name: str
    version: str
    file: str
    sha256: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> ModelInfo:
        """Identity for reports (TID 4019 algorithm name and version)."""
        return ModelInfo(name=self.name, version=self.version, sha256=self.sha256)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: Path | None = None) -> dict[str, ModelEntry]:
    """Read the manifest of a model directory, keyed by role.

    Raises
    ------
    ModelRegistryError
        If the manifest is missing or malformed.
    """
    directory = model_dir or BUNDLED_MODEL_DIR
    path = directory / MANIFEST_NAME
    try:
        body = json.loads(path.read_text())
        return {role: ModelEntry(role=role, **entry) for role, entry in body["models"].items()}
    except FileNotFoundError as exc:
        raise ModelRegistryError(f"no model manifest at {path}; train and export the reference models (make train)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelRegistryError(f"malformed model manifest {path}: {exc}") from exc


def write_manifest(entries: dict[str, ModelEntry], model_dir: Path, default_pipelines: dict[str, list[str]] | None = None) -> Path:
    """Write the manifest for ``entries`` (used by the export steps).

    ``default_pipelines`` (modality -> roles run on each lesion, in report
    order) is kept from the existing manifest when not given.
    """
    path = model_dir / MANIFEST_NAME
    if default_pipelines is None and path.is_file():
        default_pipelines = json.loads(path.read_text()).get("default_pipelines")
    body: dict[str, Any] = {
        "models": {
            role: {"name": e.name, "version": e.version, "file": e.file, "sha256": e.sha256, "parameters": e.parameters}
            for role, e in sorted(entries.items())
        }
    }
    if default_pipelines:
        body["default_pipelines"] = default_pipelines
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def verified_path(entry: ModelEntry, model_dir: Path | None = None) -> Path:
    """Path of a model file after checking it matches the manifest's sha256."""
    path = (model_dir or BUNDLED_MODEL_DIR) / entry.file
    if not path.is_file():
        raise ModelRegistryError(f"model file {path} for {entry.role} is missing")
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise ModelRegistryError(f"model file {path} has sha256 {actual}, manifest says {entry.sha256}")
    return path
