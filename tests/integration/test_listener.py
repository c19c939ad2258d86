"""StudyListener against real SCUs (dcmtk and pynetdicom) on free ports.

Covers PS3.7 C-ECHO / C-STORE, PS3.8 association negotiation (calling AE
allow-list, presentation contexts) and the PS3.4 B.2.3 failure statuses.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage, UltrasoundImageStorage, Verification  # type: ignore[attr-defined]

from service.dispatcher import Dispatcher
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from tests import dicom_factory
from tests.conftest import free_port
from tests.integration.listener_harness import SCP_AE, Service, body_after_meta, dataset_body, encode, raw_file, scu

pytestmark = pytest.mark.integration

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")


@needs_dcmtk
def test_echoscu(start_service: Callable[..., Service]) -> None:
    service = start_service()
    result = subprocess.run(
        ["echoscu", "-aet", "TESTSCU", "-aec", SCP_AE, "127.0.0.1", str(service.port)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr


def test_pynetdicom_echo(start_service: Callable[..., Service]) -> None:
    service = start_service()
    assoc = scu("TESTSCU", Verification).associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


@needs_dcmtk
def test_storescu_stores_into_spool_and_study_becomes_job(
    start_service: Callable[..., Service], tmp_path: Path, us_file: Callable[..., Path], wait: Callable[..., bool]
) -> None:
    service = start_service()
    study = generate_uid()
    files = [us_file(tmp_path, study_uid=study) for _ in range(2)]
    result = subprocess.run(
        ["storescu", "-v", "-aet", "TESTSCU", "-aec", SCP_AE, "127.0.0.1", str(service.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 2, result.stderr
    assert wait(lambda: len(service.jobs()) == 1, 5)
    [job] = service.jobs()
    assert job.study_instance_uid == study
    assert job.calling_ae_titles == ("TESTSCU",)
    assert sorted(Path(ref.path).name for ref in job.instances) == sorted(f.name for f in files)
    service.spool.verify(job)
    assert wait(lambda: service.spool.is_published(job.job_id), 5)
    assert service.queue.pending() == 1


def test_pynetdicom_store_is_durable_before_success(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    service = start_service()
    ds = us_dataset()
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assert status.Status == 0x0000
    # Success was sent, so the instance is already in the spool (fsynced) ...
    stored = service.spool.root / "incoming" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert stored.is_file()
    time.sleep(0.5)
    # ... and the study is not complete while the association is open.
    assert service.jobs() == []
    assoc.release()
    assert wait(lambda: len(service.jobs()) == 1, 5)
    assert not stored.exists()


def test_disallowed_calling_ae_is_rejected(start_service: Callable[..., Service]) -> None:
    service = start_service(allowed_ae=("GOODSCU",))
    bad = scu("BADSCU", Verification).associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert bad.is_rejected
    good = scu("GOODSCU", Verification).associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert good.is_established
    good.release()
    if shutil.which("echoscu"):
        result = subprocess.run(
            ["echoscu", "-aet", "BADSCU", "-aec", SCP_AE, "127.0.0.1", str(service.port)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode != 0
        assert "Rejected" in result.stderr or "rejected" in result.stderr.lower(), result.stderr


def test_a_title_bound_to_another_host_is_rejected_and_audited(
    start_service: Callable[..., Service], wait: Callable[..., bool]
) -> None:
    # Issue 37: per-source allow-lists with host binding. Our test client calls from 127.0.0.1.
    import json

    service = start_service(allowed_ae=("PACS1@10.9.9.9", "PACS2@127.0.0.0/8", "ANYWHERE"))
    elsewhere = scu("PACS1", Verification).associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert elsewhere.is_rejected
    assert elsewhere.acceptor.primitive.result == 0x01 and elsewhere.acceptor.primitive.diagnostic == 0x03
    for allowed in ("PACS2", "ANYWHERE"):
        assoc = scu(allowed, Verification).associate("127.0.0.1", service.port, ae_title=SCP_AE)
        assert assoc.is_established, allowed
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    audit = service.spool.root / "audit"
    assert wait(lambda: any(audit.glob("*.jsonl")), 5)
    lines = [json.loads(line) for path in audit.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert [(line["calling_ae"], line["how"]) for line in lines] == [
        ("PACS1", "rejected: calling AE not allowed from host")
    ]


def test_a_spool_at_its_quota_answers_a700_until_it_drains(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    service = start_service(spool_quota_mb=1)
    first, second = us_dataset(), us_dataset()
    for ds in (first, second):
        ds.Rows, ds.Columns = 700, 1000  # 0.7 MB each: the second does not fit in 1 MB
        ds.PixelData = np.zeros((700, 1000), dtype=np.uint8).tobytes()
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert [assoc.send_c_store(ds).Status for ds in (first, second)] == [0x0000, 0xA700]
    assoc.release()
    assert [path.name for path in service.incoming()] == [f"{first.SOPInstanceUID}.dcm"]
    # A worker finishes the study: its folder goes, and the PACS's retry fits once the spool is walked again (5 s).
    assert wait(lambda: len(service.jobs()) == 1, 5)
    service.spool.complete(service.jobs()[0].job_id)

    def retry_accepted() -> bool:
        retry = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
        status = retry.send_c_store(second).Status
        retry.release()
        return bool(status == 0x0000)

    assert wait(retry_accepted, 10, 0.5)


def test_unsupported_sop_class_is_refused_at_negotiation(start_service: Callable[..., Service], tmp_path: Path) -> None:
    service = start_service()
    assoc = scu("TESTSCU", CTImageStorage).associate("127.0.0.1", service.port, ae_title=SCP_AE)
    # The SCP rejects the only proposed context (PS3.8 §9.3.3.2 result 3,
    # abstract syntax not supported), so there is nothing to send on.
    assert not assoc.accepted_contexts
    if assoc.is_established:
        assoc.abort()
    if shutil.which("storescu"):
        ct = Dataset()
        ct.file_meta = FileMetaDataset()
        ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ct.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ct.SOPClassUID = CTImageStorage
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID
        ct.StudyInstanceUID = generate_uid()
        ct.SeriesInstanceUID = generate_uid()
        ct.Modality = "CT"
        path = tmp_path / "ct.dcm"
        ct.save_as(path, enforce_file_format=True)
        result = subprocess.run(
            ["storescu", "-aet", "TESTSCU", "-aec", SCP_AE, "127.0.0.1", str(service.port), str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (
            "no presentation context" in result.stderr.lower() or "no acceptable presentation" in result.stderr.lower()
        ), result.stderr
    assert service.incoming() == []


@pytest.mark.usefixtures("send_raw_files")
def test_bad_payloads_fail_and_listener_keeps_serving(
    start_service: Callable[..., Service],
    tmp_path: Path,
    us_dataset: Callable[..., Dataset],
    us_file: Callable[..., Path],
) -> None:
    service = start_service()
    good = us_file(tmp_path)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-700])
    garbage = raw_file(
        tmp_path / "garbage.dcm",
        UltrasoundImageStorage,
        generate_uid(),
        b"this is not a DICOM data set at all, just text" * 20,
    )
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert assoc.is_established
    truncated_status = assoc.send_c_store(truncated)
    garbage_status = assoc.send_c_store(garbage)
    ok_status = assoc.send_c_store(us_dataset())  # same association keeps working
    assoc.release()
    assert truncated_status.Status == 0xC210
    assert garbage_status.Status in (0xC210, 0xA900)
    assert ok_status.Status == 0x0000
    assert len(service.incoming()) == 1
    # A fresh association works too.
    again = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert again.send_c_store(us_dataset()).Status == 0x0000
    again.release()


@pytest.mark.usefixtures("send_raw_files")
def test_dataset_errors_get_a900(
    start_service: Callable[..., Service], tmp_path: Path, us_dataset: Callable[..., Dataset]
) -> None:
    service = start_service()
    no_study = us_dataset()
    del no_study.StudyInstanceUID
    bad_study = us_dataset()
    bad_study.StudyInstanceUID = "1.2.3/../../etc"
    wrong_class = us_dataset()
    wrong_class.SOPClassUID = SECONDARY_CAPTURE  # body says SC, context says US
    files = []
    for index, ds in enumerate((no_study, bad_study, wrong_class)):
        files.append(
            raw_file(tmp_path / f"bad{index}.dcm", UltrasoundImageStorage, ds.SOPInstanceUID, dataset_body(ds))
        )
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    statuses = [assoc.send_c_store(path).Status for path in files]
    assoc.release()
    assert statuses == [0xA900, 0xA900, 0xA900]
    assert service.incoming() == []
    assert not any((service.spool.root / "incoming").iterdir())


def test_oversized_instance_gets_a700(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset]
) -> None:
    service = start_service(max_instance_mb=1)
    ds = us_dataset()
    ds.Rows, ds.Columns = 1100, 1024
    ds.PixelData = np.zeros((1100, 1024), dtype=np.uint8).tobytes()
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA700
    assert service.incoming() == []


def test_abort_counts_as_release(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    service = start_service()
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert assoc.send_c_store(us_dataset()).Status == 0x0000
    assoc.abort()
    assert wait(lambda: len(service.jobs()) == 1, 5)


def test_restart_recovers_unsealed_study(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    first = start_service(quiet_period_s=30.0, stable_age_s=60.0)
    ds = us_dataset()
    assoc = scu().associate("127.0.0.1", first.port, ae_title=SCP_AE)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    first.listener.stop()
    first.dispatcher.stop()  # the process "dies" long before the quiet period ends
    assert first.jobs() == []
    # Same spool: recover() re-tracks the study as interrupted, from the restart (not from its file's time), so a
    # sender still retrying has until stable_age_s; nobody re-sends here, so that is when it is sealed.
    second = start_service(quiet_period_s=0.3, stable_age_s=2.0)
    time.sleep(1.0)
    assert second.jobs() == [], "sealed before a re-sending PACS had its chance"
    assert wait(lambda: len(second.jobs()) == 1, 5)
    assert second.jobs()[0].study_instance_uid == ds.StudyInstanceUID


def test_a_study_interrupted_by_a_restart_waits_for_the_re_send_and_makes_one_job(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    # Issue 37, failure 4: after a kill mid-association the restarted listener sealed the received images at once
    # (quiet period measured from file times), and the PACS's re-send of the whole association made a second job.
    first = start_service(quiet_period_s=30.0, stable_age_s=60.0)
    study = [us_dataset()]
    study += [us_dataset(study_uid=study[0].StudyInstanceUID) for _ in range(3)]
    assoc = scu().associate("127.0.0.1", first.port, ae_title=SCP_AE)
    assert [assoc.send_c_store(ds).Status for ds in study[:2]] == [0x0000, 0x0000]
    assoc.abort()  # the transfer breaks off with two of four instances received ...
    first.listener.stop()
    first.dispatcher.stop()  # ... and the process is gone
    second = start_service(quiet_period_s=0.3, stable_age_s=30.0)
    time.sleep(1.0)  # longer than the quiet period: not sealed, the sender has not come back yet
    assert second.jobs() == []
    resend = scu().associate("127.0.0.1", second.port, ae_title=SCP_AE)
    assert [resend.send_c_store(ds).Status for ds in study] == [0x0000] * 4  # the PACS re-sends all of it
    resend.release()
    assert wait(lambda: len(second.jobs()) == 1, 5)
    time.sleep(1.0)
    jobs = second.jobs()
    assert len(jobs) == 1, "one study, one job"
    assert {i.sop_instance_uid for i in jobs[0].instances} == {ds.SOPInstanceUID for ds in study}


class FlakyQueue:
    """A JobQueue whose broker is down for the first ``failures`` publishes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[str] = []

    def publish(self, job: StudyJob) -> None:
        from service.errors import QueueUnavailable

        if self.failures:
            self.failures -= 1
            raise QueueUnavailable("broker down")
        self.published.append(job.job_id)

    def consume(self, handler: Callable[[StudyJob], None], stop: object) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


def test_dispatcher_retries_publish_and_recovers_unpublished(
    spool_dir: Path, us_dataset: Callable[..., Dataset]
) -> None:
    clock = [1000.0]
    settings = Settings(quiet_period_s=1.0, stable_age_s=10.0, spool_dir=spool_dir, metrics_port=0)
    spool = Spool(spool_dir)
    queue = FlakyQueue(failures=2)
    dispatcher = Dispatcher(settings, spool, queue, publish_backoff_s=1.0, clock=lambda: clock[0])
    ds = us_dataset()
    spool.store_instance(ds.StudyInstanceUID, ds.SOPInstanceUID, encode(ds))
    dispatcher.instance_stored(ds.StudyInstanceUID, "assoc-1", calling_ae="US1")
    dispatcher.association_released("assoc-1")
    assert dispatcher.tick() == []  # quiet period not over
    clock[0] += 1.0
    assert dispatcher.tick() == []  # sealed, first publish fails
    [job_id] = dispatcher.pending_publish()
    assert spool.is_sealed(job_id) and not spool.is_published(job_id)
    assert dispatcher.tick() == []  # backing off: no attempt yet
    clock[0] += 1.0
    assert dispatcher.tick() == []  # second failure, backoff doubles
    clock[0] += 1.0
    assert dispatcher.tick() == []
    clock[0] += 1.0
    assert dispatcher.tick() == [job_id]
    assert queue.published == [job_id] and spool.is_published(job_id)
    assert spool.load_job(job_id).calling_ae_titles == ("US1",)

    # A job sealed by a process that died before its publish was confirmed:
    ds2 = us_dataset()
    spool.store_instance(ds2.StudyInstanceUID, ds2.SOPInstanceUID, encode(ds2))
    orphan = spool.seal_study(ds2.StudyInstanceUID)
    restarted_queue = FlakyQueue(failures=0)
    restarted = Dispatcher(settings, Spool(spool_dir), restarted_queue, clock=lambda: clock[0])
    restarted.recover()
    assert restarted.tick() == [orphan]  # the confirmed one is not republished
    assert restarted_queue.published == [orphan]


def test_dispatcher_adopts_a_sealed_job_it_lost_track_of(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    """A seal that failed after its rename leaves a job dir no tracked study points to: the sweep publishes it."""
    from service.dispatcher import RESCAN_INTERVAL_S

    clock = [5000.0]
    settings = Settings(quiet_period_s=1.0, stable_age_s=10.0, spool_dir=spool_dir, metrics_port=0)
    spool = Spool(spool_dir)
    queue = FlakyQueue(failures=0)
    dispatcher = Dispatcher(settings, spool, queue, clock=lambda: clock[0])
    assert dispatcher.tick() == []  # first sweep: nothing on disk yet
    ds = us_dataset()
    spool.store_instance(ds.StudyInstanceUID, ds.SOPInstanceUID, encode(ds))
    stray = spool.seal_study(ds.StudyInstanceUID)  # sealed behind the dispatcher's back
    clock[0] += RESCAN_INTERVAL_S / 2
    assert dispatcher.tick() == []  # not swept again yet
    clock[0] += RESCAN_INTERVAL_S
    assert dispatcher.tick() == [stray]
    assert spool.is_published(stray) and queue.published == [stray]


def test_an_instance_of_another_patient_is_refused_and_the_study_keeps_its_own(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    # Issue 37, failure 1: a study holding two PatientIDs gave one SR under the first patient with outlines
    # "selected from" the other's image. The stray instance is refused; the study's own go on to one job.
    service = start_service()
    first = us_dataset()
    stray = us_dataset(study_uid=first.StudyInstanceUID)
    stray.PatientID = "ANOTHER-PATIENT"
    own = us_dataset(study_uid=first.StudyInstanceUID)
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    statuses = [assoc.send_c_store(ds).Status for ds in (first, stray, own)]
    assoc.release()
    assert statuses == [0x0000, 0xC212, 0x0000]
    assert wait(lambda: len(service.jobs()) == 1, 5)
    job = service.jobs()[0]
    assert {i.sop_instance_uid for i in job.instances} == {first.SOPInstanceUID, own.SOPInstanceUID}
    # Sent again later, after the study was sealed, the stray is still refused.
    again = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert again.send_c_store(stray).Status == 0xC212
    again.release()


def test_an_image_declaring_a_memory_bomb_is_refused_from_its_header(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset]
) -> None:
    # Issue 37, failure 2: 4.5 MB of RLE declaring 12000 x 12000 x 16 bits took a worker to 14 GB. Refused before
    # anything is stored or decoded, with a failure status the sender does not retry (not 0xA7xx).
    service = start_service()
    bomb = us_dataset()
    bomb.Rows, bomb.Columns = 12000, 12000
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    status = assoc.send_c_store(bomb)
    ordinary = assoc.send_c_store(us_dataset())
    assoc.release()
    assert (status.Status, ordinary.Status) == (0xC211, 0x0000)
    stored = {p.name for p in (service.spool.root / "incoming").rglob("*.dcm")} | {
        p.name for p in (service.spool.root / "studies").rglob("*.dcm")
    }
    assert f"{bomb.SOPInstanceUID}.dcm" not in stored


def test_a_finished_study_sent_again_makes_no_second_job(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    # A manual "send again", or a routing rule that fires twice: every instance is acknowledged (the PACS must not
    # retry forever) and nothing is analysed or reported twice. A genuinely new instance still makes a job.
    service = start_service()
    study = [us_dataset()]
    study.append(us_dataset(study_uid=study[0].StudyInstanceUID))
    for _ in range(2):
        assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
        assert [assoc.send_c_store(ds).Status for ds in study] == [0x0000, 0x0000]
        assoc.release()
        assert wait(lambda: not service.incoming(), 5)
    time.sleep(0.5)
    assert len(service.jobs()) == 1
    later = us_dataset(study_uid=study[0].StudyInstanceUID)
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert assoc.send_c_store(later).Status == 0x0000
    assoc.release()
    assert wait(lambda: len(service.jobs()) == 2, 5)
    newest = max(service.jobs(), key=lambda job: job.job_id)
    assert [i.sop_instance_uid for i in newest.instances] == [later.SOPInstanceUID]


def test_every_association_leaves_one_audit_line(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    # Issue 37: who sent what, when, and what we answered. One JSON line per association, without patient identity.
    import json

    service = start_service()
    good, bomb = us_dataset(), us_dataset()
    bomb.Rows = bomb.Columns = 20000
    assoc = scu("AUDITED").associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert [assoc.send_c_store(ds).Status for ds in (good, bomb)] == [0x0000, 0xC211]
    assoc.release()
    aborted = scu("BROKEN").associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert aborted.send_c_store(us_dataset()).Status == 0x0000
    aborted.abort()
    audit = service.spool.root / "audit"

    def lines() -> list[dict[str, object]]:
        return [json.loads(line) for path in sorted(audit.glob("*.jsonl")) for line in path.read_text().splitlines()]

    assert wait(lambda: len(lines()) == 2, 5)
    first, second = sorted(lines(), key=lambda line: str(line["calling_ae"]))
    assert (first["calling_ae"], first["how"], first["statuses"]) == ("AUDITED", "released", {"0x0000": 1, "0xC211": 1})
    assert first["studies"] == [good.StudyInstanceUID] and str(first["peer"]).startswith("127.0.0.1:")
    # An A-ABORT and the connection closing come close together; either way it was not released.
    assert second["calling_ae"] == "BROKEN" and second["how"] in ("aborted", "connection closed")
    assert "TEST0001" not in json.dumps(lines()), "no patient identity"


def test_associations_past_the_limit_are_rejected_and_the_first_goes_on(
    start_service: Callable[..., Service], us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    service = start_service(max_associations=1)
    first = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert first.is_established
    second = scu("ANOTHER").associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert not second.is_established and second.is_rejected, "past max_associations: rejected, not queued"
    assert first.send_c_store(us_dataset()).Status == 0x0000
    first.release()
    established: list[Any] = []

    def room_again() -> bool:  # the first association's thread ends a moment after its release
        attempt = scu("ANOTHER").associate("127.0.0.1", service.port, ae_title=SCP_AE)
        if attempt.is_established:
            established.append(attempt)
        return bool(established)

    assert wait(room_again, 5), "room again once the first ended"
    established[0].release()


def test_the_listener_announces_its_maximum_pdu_length(start_service: Callable[..., Service]) -> None:
    # PS3.8 D.1.1: senders cut data sets into PDUs no longer than what we announce (max_pdu_kb, 1 MB by default).
    for kb in (1024, 64):
        service = start_service(max_pdu_kb=kb, port=free_port())
        assoc = scu(ae_title="PDUSCU").associate("127.0.0.1", service.port, ae_title=SCP_AE)
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == kb * 1024
        assoc.release()


def test_pdus_are_read_whole_and_an_instance_in_pdus_larger_than_the_read_ahead_arrives_byte_identical(
    start_service: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import listener

    reads: list[int] = []
    whole_read = listener._WholeReadSocket.recv

    def counted(self: listener._WholeReadSocket, nr_bytes: int) -> bytearray:
        reads.append(nr_bytes)
        return whole_read(self, nr_bytes)

    monkeypatch.setattr(listener._WholeReadSocket, "recv", counted)  # a spy: the real read still runs
    service = start_service(max_pdu_kb=4096)  # 4 MB PDUs: one read grows its buffer past the 1 MB read-ahead
    pixels = (np.arange(1500 * 1000 * 3, dtype=np.uint32) % 253).astype(np.uint8).reshape(1500, 1000, 3)
    ds = dicom_factory.make_us_dataset(pixels, photometric="RGB")
    assoc = scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    raw = (service.spool.root / "incoming" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm").read_bytes()
    assert body_after_meta(raw) == dataset_body(ds)  # our Part 10 header, then the data set as it arrived
    assert max(reads) > listener._READ_AHEAD, "the association read its PDUs through _WholeReadSocket"
