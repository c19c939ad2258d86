"""A job delivered twice produces no second report in the PACS (idempotent result UIDs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Destination
from service.spool import Spool
from tests.e2e.results import SC_CLASS, SR_CLASS, instances_of_class
from tests.integration.orthanc import OrthancServer

pytestmark = pytest.mark.integration


def test_job_handled_twice_leaves_one_report_in_orthanc(orthanc_factory, sample_study: Path, tmp_path: Path) -> None:
    from models.inference.pipeline import load_bmode_pipeline
    from workers.consumer import JobHandler
    from workers.sender import ResultSender
    from workers.sr_writer import ReportContext

    pacs: OrthancServer = orthanc_factory({})
    spool = Spool(tmp_path / "spool")
    study_uid = ""
    for path in sorted(sample_study.glob("*.dcm")):
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
        study_uid = str(header.StudyInstanceUID)
        spool.store_instance(study_uid, str(header.SOPInstanceUID), path.read_bytes())
    job_id = spool.seal_study(study_uid)
    assert job_id is not None
    job = spool.load_job(job_id)

    sender = ResultSender(
        [Destination.parse(f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}")], "BREASTAI", retries=2, backoff_s=0.5
    )
    pipeline = load_bmode_pipeline()
    handler = JobHandler(spool.root, pipeline, sender, ReportContext(device_observer_uid="2.25.1"))
    handler(job)
    first = {i["Tags"]["SOPInstanceUID"] for i in pacs.study_instances(study_uid)}
    handler(job)  # the broker redelivers: same job again
    second = {i["Tags"]["SOPInstanceUID"] for i in pacs.study_instances(study_uid)}

    assert first == second
    assert len(instances_of_class(pacs, study_uid, SR_CLASS)) == 1
    assert len(instances_of_class(pacs, study_uid, SC_CLASS)) == len(list(sample_study.glob("*.dcm"))) * len(
        pipeline.families
    )
