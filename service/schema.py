"""The StudyJob message: what the listener hands to the workers.

A job names one study and the spooled instances that belong to it, by path
(relative to the spool root, so that listener and workers may mount the
shared spool volume at different places) and sha256. It never carries
pixels. The document is JSON with an explicit schema version; a reader
refuses versions it does not know instead of guessing.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from service.errors import JobSchemaError

SCHEMA_ID = "breastai.studyjob"
SCHEMA_VERSION = 1

# DICOM PS3.5 §9.1: UIDs are dot-separated digit groups, at most 64 characters.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def is_valid_uid(value: str) -> bool:
    """Tell whether ``value`` is a syntactically valid DICOM UID (PS3.5 §9.1).

    Used before a UID becomes part of a file system path, so that a peer
    cannot steer where the spool writes.
    """
    return len(value) <= 64 and bool(_UID_PATTERN.match(value))


@dataclass(frozen=True)
class InstanceRef:
    """One spooled DICOM instance of a study."""

    path: str
    sha256: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    modality: str

    def __post_init__(self) -> None:
        if self.path.startswith("/") or ".." in self.path.split("/"):
            raise JobSchemaError(f"instance path must be relative to the spool root: {self.path!r}")
        if not _SHA256_PATTERN.match(self.sha256):
            raise JobSchemaError(f"sha256 is not 64 lowercase hex digits: {self.sha256!r}")
        for name in ("sop_class_uid", "sop_instance_uid", "series_instance_uid"):
            if not is_valid_uid(getattr(self, name)):
                raise JobSchemaError(f"{name} is not a valid UID: {getattr(self, name)!r}")


@dataclass(frozen=True)
class StudyJob:
    """A complete study, ready for analysis.

    Attributes
    ----------
    job_id
        Unique per dispatch of a study (a study that receives more instances
        later is dispatched again under a new job id).
    study_instance_uid
        The study the results must be written back into.
    calling_ae_titles
        The AE titles that sent the instances (for routing and audit).
    instances
        The spooled instances, sorted by SOP Instance UID.
    """

    job_id: str
    study_instance_uid: str
    created_at: str
    instances: tuple[InstanceRef, ...]
    calling_ae_titles: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not is_valid_uid(self.study_instance_uid):
            raise JobSchemaError(f"study_instance_uid is not a valid UID: {self.study_instance_uid!r}")
        if not re.match(r"^[A-Za-z0-9_.-]{1,128}$", self.job_id):
            raise JobSchemaError(f"job_id has characters outside [A-Za-z0-9_.-]: {self.job_id!r}")
        if not self.instances:
            raise JobSchemaError("a StudyJob must reference at least one instance")

    def to_json(self) -> str:
        """Serialise to the versioned JSON document."""
        body: dict[str, Any] = {"schema": SCHEMA_ID, "version": SCHEMA_VERSION, **asdict(self)}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StudyJob:
        """Parse a StudyJob document, refusing unknown schemas and versions.

        Raises
        ------
        JobSchemaError
            If the document is not JSON, names another schema or version, or
            has missing or malformed fields.
        """
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JobSchemaError(f"StudyJob is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise JobSchemaError("StudyJob must be a JSON object")
        if body.get("schema") != SCHEMA_ID:
            raise JobSchemaError(f"unknown schema {body.get('schema')!r}, expected {SCHEMA_ID!r}")
        if body.get("version") != SCHEMA_VERSION:
            raise JobSchemaError(
                f"unsupported StudyJob version {body.get('version')!r}, this build reads {SCHEMA_VERSION}"
            )
        try:
            instances = tuple(InstanceRef(**item) for item in body["instances"])
            return cls(
                job_id=body["job_id"],
                study_instance_uid=body["study_instance_uid"],
                created_at=body["created_at"],
                instances=instances,
                calling_ae_titles=tuple(body.get("calling_ae_titles", ())),
            )
        except (KeyError, TypeError) as exc:
            raise JobSchemaError(f"StudyJob is missing or has a malformed field: {exc}") from exc
