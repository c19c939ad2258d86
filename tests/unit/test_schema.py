"""StudyJob: round trip, refusal of unknown versions, bad paths and UIDs."""

from __future__ import annotations

import json

import pytest

from service.errors import JobSchemaError
from service.schema import SCHEMA_VERSION, InstanceRef, StudyJob, is_valid_uid

SHA = "a" * 64


def ref(**overrides: str) -> InstanceRef:
    values = dict(
        path="studies/j1/1.2.3.dcm",
        sha256=SHA,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        sop_instance_uid="1.2.3",
        series_instance_uid="1.2.4",
        modality="US",
    )
    values.update(overrides)
    return InstanceRef(**values)


def job(**overrides: object) -> StudyJob:
    values: dict[str, object] = dict(
        job_id="20250101T000000Z-abc",
        study_instance_uid="1.2.5",
        created_at="2025-01-01T00:00:00+00:00",
        instances=(ref(),),
        calling_ae_titles=("US1",),
    )
    values.update(overrides)
    return StudyJob(**values)  # type: ignore[arg-type]


def test_round_trip() -> None:
    original = job(instances=(ref(), ref(sop_instance_uid="1.2.9", path="studies/j1/1.2.9.dcm")))
    text = original.to_json()
    assert StudyJob.from_json(text) == original
    assert StudyJob.from_json(text.encode()) == original
    body = json.loads(text)
    assert body["schema"] == "breastai.studyjob" and body["version"] == SCHEMA_VERSION


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_refuses_other_versions(version: object) -> None:
    body = json.loads(job().to_json())
    body["version"] = version
    with pytest.raises(JobSchemaError, match="version"):
        StudyJob.from_json(json.dumps(body))


@pytest.mark.parametrize(
    "text",
    [b"not json", b"[1, 2]", json.dumps({"schema": "other", "version": 1}).encode(), b"\xff\xfe"],
)
def test_refuses_non_documents(text: bytes) -> None:
    with pytest.raises(JobSchemaError):
        StudyJob.from_json(text)


def test_refuses_missing_fields() -> None:
    body = json.loads(job().to_json())
    del body["created_at"]
    with pytest.raises(JobSchemaError, match="missing"):
        StudyJob.from_json(json.dumps(body))


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.dcm", "studies/../../x.dcm"])
def test_refuses_paths_outside_the_spool(path: str) -> None:
    with pytest.raises(JobSchemaError, match="relative"):
        ref(path=path)


@pytest.mark.parametrize("field", ["sop_class_uid", "sop_instance_uid", "series_instance_uid"])
@pytest.mark.parametrize("bad", ["", "1..2", "1.2.a", "../1", "1." + "2" * 70])
def test_refuses_bad_uids(field: str, bad: str) -> None:
    with pytest.raises(JobSchemaError, match=field):
        ref(**{field: bad})


def test_refuses_bad_job_fields() -> None:
    with pytest.raises(JobSchemaError, match="study_instance_uid"):
        job(study_instance_uid="1.2.x")
    with pytest.raises(JobSchemaError, match="job_id"):
        job(job_id="../../etc")
    with pytest.raises(JobSchemaError, match="at least one"):
        job(instances=())
    with pytest.raises(JobSchemaError, match="sha256"):
        ref(sha256="A" * 64)


def test_is_valid_uid() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.6.1")
    assert not is_valid_uid("1.2.840/../x")
    assert not is_valid_uid("." + "1" * 10)
    assert not is_valid_uid("1" * 65)
