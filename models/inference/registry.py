"""The model registry: which model files exist, what they are, and proof they are intact.

``weights/manifest.json`` lists every reference model with its name,
version, file, sha256 and preprocessing parameters. Each entry's parameters
are parsed once, on first use, into the typed view of
:mod:`models.inference.manifest` (:attr:`ModelEntry.spec`); loading verifies the checksums of the model file
and its side files, so a corrupted or swapped file is refused rather than run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from models.errors import ManifestError
from models.errors import ModelRegistryError as ModelRegistryError  # raised here; defined in the one error tree
from models.inference.findings import ModelInfo
from models.inference.manifest import ModelKind, ModelSpec, SpecT, expect_spec, kind_of, parse_spec

BUNDLED_MODEL_DIR = Path(__file__).resolve().parents[1] / "weights"
MANIFEST_NAME = "manifest.json"
MANIFEST_LOCK_NAME = ".manifest.lock"  # empty; only ever flock-ed (git-ignored)


@dataclass(frozen=True)
class ModelEntry:
    """One model as listed in the manifest.

    ``parameters`` is the manifest's JSON object as written by training and
    export, and is what :func:`write_manifest` writes back; serving reads the
    typed :attr:`spec` parsed from it instead. The parameters are not to be
    changed after the entry is made: the spec is parsed once.
    """

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

    @cached_property
    def _parsed(self) -> ModelSpec | ManifestError:
        # The problem is kept rather than raised: an export merges its entry into a manifest whose other entries
        # may be half-made, and only a model that is served (or evaluated) must be complete.
        try:
            return parse_spec(self.role, self.parameters)
        except ManifestError as problem:
            return problem

    @property
    def spec(self) -> ModelSpec:
        """The typed view of :attr:`parameters`.

        Raises
        ------
        ManifestError
            A field the model needs is missing or holds a value it cannot use
            (the message names the role and the field).
        """
        parsed = self._parsed
        if isinstance(parsed, ManifestError):
            raise ManifestError(str(parsed))
        return parsed

    def spec_as(self, wanted: type[SpecT]) -> SpecT:
        """:attr:`spec` as the kind a caller needs (:class:`~models.inference.manifest.NetworkSpec`, ...).

        Raises
        ------
        ManifestError
            The spec does not parse, or the entry is of another kind.
        """
        return expect_spec(self.spec, wanted)

    @property
    def kind(self) -> ModelKind:
        """Which kind of model the entry is; readable even where the rest of the spec is incomplete.

        Raises
        ------
        ManifestError
            ``parameters.kind`` holds a value no loader knows.
        """
        parsed = self._parsed
        return parsed.kind if isinstance(parsed, ModelSpec) else kind_of(self.role, self.parameters)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: Path | None = None) -> dict[str, ModelEntry]:
    """Read the manifest of a model directory, keyed by role.

    Each entry's parameters are parsed once, when its typed
    :attr:`ModelEntry.spec` is first asked for; an entry whose fields are
    incomplete is still listed (an export may be merging into this manifest),
    and is refused when its spec is asked for, that is when it is served or
    evaluated.

    Raises
    ------
    ModelRegistryError
        If the manifest is missing or malformed.
    """
    return read_manifest_and_pipelines(model_dir)[0]


def read_manifest_and_pipelines(model_dir: Path | None = None) -> tuple[dict[str, ModelEntry], Any]:
    """:func:`read_manifest` and the manifest's ``default_pipelines`` as written (``{}`` when absent), from one read.

    Raises
    ------
    ModelRegistryError
        If the manifest is missing or malformed.
    """
    directory = model_dir or BUNDLED_MODEL_DIR
    path = directory / MANIFEST_NAME
    try:
        body = json.loads(path.read_text())
        entries = {role: ModelEntry(role=role, **entry) for role, entry in body["models"].items()}
    except FileNotFoundError as exc:
        raise ModelRegistryError(
            f"no model manifest at {path}; train and export the reference models (make train)"
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelRegistryError(f"malformed model manifest {path}: {exc}") from exc
    return entries, body.get("default_pipelines", {})


def write_manifest(
    entries: dict[str, ModelEntry], model_dir: Path, default_pipelines: dict[str, list[str]] | None = None
) -> Path:
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
    # Written beside and renamed over, so a reader never sees half a manifest.
    staging = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}")
    try:
        staging.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


@contextmanager
def manifest_lock(model_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a model folder's manifest while it is read, changed and written.

    ``make train`` runs exports side by side (the segmenter lane beside the
    families), and each export rewrites the whole manifest: without the lock
    one export's entry could be lost to another's write. The lock is taken on
    ``.manifest.lock`` beside the manifest, opened for writing: on NFS Linux
    emulates ``flock`` with POSIX locks, which refuse a read-only descriptor
    (such as a folder's).
    """
    descriptor = os.open(model_dir / MANIFEST_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def merge_into_manifest(
    model_dir: Path,
    changed: dict[str, ModelEntry],
    update_pipelines: Callable[[dict[str, list[str]]], dict[str, list[str]]] | None = None,
) -> Path:
    """Add or replace ``changed`` in the folder's manifest, keeping every other entry as it is now on disk.

    The manifest is read again under :func:`manifest_lock`, so entries that
    another export wrote after the caller started are kept.
    ``update_pipelines`` maps the default pipelines found on disk to the new
    ones (kept as they are when not given).

    Raises
    ------
    ModelRegistryError
        The manifest on disk is malformed: it is left for a person to look at
        rather than replaced by one that lists only ``changed``.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    with manifest_lock(model_dir):
        return merge_while_locked(model_dir, changed, update_pipelines)


def merge_while_locked(
    model_dir: Path,
    changed: dict[str, ModelEntry],
    update_pipelines: Callable[[dict[str, list[str]]], dict[str, list[str]]] | None = None,
) -> Path:
    """:func:`merge_into_manifest` for a caller that already holds :func:`manifest_lock`.

    A caller that must check the manifest and replace a model file as one
    step (``compress_weights``) takes the lock itself; ``flock`` locks belong
    to an open file, so taking it a second time in the same process would
    wait for ever.
    """
    path = model_dir / MANIFEST_NAME
    entries = read_manifest(model_dir) if path.exists() else {}
    pipelines = json.loads(path.read_text()).get("default_pipelines") if path.exists() else None
    if update_pipelines is not None:
        pipelines = update_pipelines({str(k): [str(r) for r in v] for k, v in (pipelines or {}).items()})
    return write_manifest({**entries, **changed}, model_dir, pipelines)


def _verified(entry: ModelEntry, what: str, path: Path, field_prefix: str, sha256: str) -> Path:
    """``path`` after checking it exists and matches ``sha256``; ``what`` and ``field_prefix`` name it in refusals."""
    if not path.is_file():
        raise ModelRegistryError(f"model {entry.role}: {what} {path} (manifest field {field_prefix}file) is missing")
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelRegistryError(
            f"model {entry.role}: {what} {path} has sha256 {actual}, manifest field {field_prefix}sha256 says {sha256}"
        )
    return path


def verified_path(entry: ModelEntry, model_dir: Path | None = None) -> Path:
    """Path of a model file after checking it matches the manifest's sha256.

    Raises
    ------
    ModelRegistryError
        The file is missing or its sha256 differs (the message names the model and the manifest field).
    """
    return _verified(entry, "model file", (model_dir or BUNDLED_MODEL_DIR) / entry.file, "", entry.sha256)


def verified_side_files(entry: ModelEntry, model_dir: Path | None = None) -> dict[str, Path]:
    """Key -> path of each of the entry's side files, after checking each matches its sha256.

    Raises
    ------
    ManifestError
        The entry's spec does not parse.
    ModelRegistryError
        A side file is missing or its sha256 differs (the message names the model and the manifest field).
    """
    return {
        key: _verified(
            entry,
            "side file",
            (model_dir or BUNDLED_MODEL_DIR) / side.file,
            f"parameters.side_files.{key}.",
            side.sha256,
        )
        for key, side in entry.spec.side_files.items()
    }
