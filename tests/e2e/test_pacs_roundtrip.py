"""A breast US study sent by a real PACS (Orthanc) comes back into it as SR + heat-map overlays.

Real components only: Orthanc started on free ports, the ``breastai``
service as its own process, real DICOM over real sockets, dcmtk and
dicom3tools checking what came back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest

from models.inference.pipeline import default_families
from models.inference.registry import read_manifest
from tests.e2e.results import (
    RESULT_TIMEOUT_S,
    SC_CLASS,
    SR_CLASS,
    content_texts,
    dciodvfy_errors,
    download,
    dsrdump,
    evidence_uids,
    instances_of_class,
    numeric_values,
    serve_args,
    start_pacs_and_service,
    wait_for_results,
)
from tests.integration.orthanc import OrthancServer

pytestmark = pytest.mark.integration


def _upload_study(pacs: OrthancServer, folder: Path) -> tuple[str, list[str], set[str]]:
    ids = [pacs.upload(path) for path in sorted(folder.glob("*.dcm"))]
    sources = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in folder.glob("*.dcm")}
    study_uid = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    return study_uid, ids, sources


def _metric(metrics_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_study_sent_by_orthanc_comes_back_as_sr_and_overlays(
    orthanc_factory, service_factory, free_ports, sample_study: Path, tmp_path: Path
) -> None:
    pacs, _service, _, metrics_port = start_pacs_and_service(orthanc_factory, service_factory, free_ports, tmp_path)
    study_uid, ids, sources = _upload_study(pacs, sample_study)

    pacs.send_to_modality("BREASTAI", ids)
    expected_overlays = len(sources) * len(default_families())  # one per image and configured family
    wait_for_results(pacs, study_uid, expected_overlays, "SR and overlays in Orthanc")

    reports = instances_of_class(pacs, study_uid, SR_CLASS)
    overlays = instances_of_class(pacs, study_uid, SC_CLASS)
    assert len(reports) == 1 and len(overlays) == expected_overlays

    report = download(pacs, reports[0])
    assert report.StudyInstanceUID == study_uid
    assert evidence_uids(report) == sources
    texts = content_texts(report)
    assert any("BreastAI" in t for t in texts), "algorithm identification (TID 4019) names the model"
    probabilities = numeric_values(report, "Probability of cancer")
    lesion_groups = [t for t in texts if t.startswith("Lesion")]
    if probabilities:
        assert all(0.0 <= p <= 1.0 for p in probabilities)
    else:
        assert any("no lesion" in t.lower() for t in texts), "a report without lesions must say so"
    # Each lesion carries one score per configured family, with its own algorithm identification.
    tasks = [read_manifest()[family].parameters.get("task", "malignancy") for family in default_families()]
    assert len(probabilities) == len(lesion_groups) * tasks.count("malignancy")
    assert len(numeric_values(report, "Probability of BI-RADS 4 or 5 assessment")) == len(lesion_groups) * tasks.count(
        "birads_high"
    )

    report_path = tmp_path / "report.dcm"
    report.save_as(report_path)
    assert dciodvfy_errors(report_path) == []
    dump = dsrdump(report_path)
    assert "Imaging Measurement Report" in dump

    for overlay_instance in overlays:
        overlay = download(pacs, overlay_instance)
        assert overlay.StudyInstanceUID == study_uid
        assert overlay.SamplesPerPixel == 3 and overlay.BurnedInAnnotation == "YES"
        assert str(overlay.SourceImageSequence[0].ReferencedSOPInstanceUID) in sources
        overlay_path = tmp_path / f"{overlay.SOPInstanceUID}.dcm"
        overlay.save_as(overlay_path)
        assert dciodvfy_errors(overlay_path) == []

    assert _metric(metrics_port, "breastai_instances_received_total") == len(sources)
    assert _metric(metrics_port, "breastai_jobs_done_total") == 1
    assert _metric(metrics_port, "breastai_jobs_waiting_publish") == 0
    assert _metric(metrics_port, "breastai_spool_free_bytes") > 0
    # The probes a load balancer or Kubernetes reads: every check named, all passing once the study went through.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health/ready", timeout=5) as response:
        ready = json.loads(response.read())
    assert response.status == 200 and ready == {
        "status": "ok",
        "checks": {"models": "ok", "queue": "ok", "spool": "ok"},
    }
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health/live", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok", "checks": {"dispatcher": "ok"}}


def test_listener_killed_after_acknowledging_still_delivers(
    orthanc_factory, service_factory, free_ports, sample_study: Path, storescu_bin: str, tmp_path: Path
) -> None:
    """SIGKILL right after 0x0000 (before the quiet period ends); a restart must still produce the results."""
    port, metrics_port = free_ports(2)
    pacs = orthanc_factory({"BREASTAI": ("BREASTAI", "127.0.0.1", port)})
    # A quiet period far longer than the test: the study cannot be dispatched before the kill.
    first = service_factory(
        "serve", serve_args(port, metrics_port, pacs, tmp_path, quiet_period=600), {"BREASTAI_STABLE_AGE_S": "900"}
    )
    first.wait_for_echo(port)
    files = sorted(str(p) for p in sample_study.glob("*.dcm"))
    sent = subprocess.run(
        [storescu_bin, "-aec", "BREASTAI", "-aet", "MODALITY", "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert pacs.study_id(study_uid) is None, "nothing reached the PACS before the crash"
    # The restarted service holds the interrupted study open for a re-send until stable_age_s (nobody re-sends here).
    second = service_factory(
        "serve", serve_args(port, metrics_port, pacs, tmp_path, quiet_period=1), {"BREASTAI_STABLE_AGE_S": "5"}
    )
    second.wait_for_echo(port)
    expected_overlays = len(files) * len(default_families())
    wait_for_results(pacs, study_uid, expected_overlays, "results after restart")
    assert len(instances_of_class(pacs, study_uid, SR_CLASS)) == 1


def test_split_listen_and_work_over_rabbitmq(
    orthanc_factory, service_factory, free_ports, sample_study: Path, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    """``breastai listen`` and ``breastai work`` as separate processes, joined by the real broker."""
    port, listen_metrics, work_metrics = free_ports(3)
    pacs = orthanc_factory({"BREASTAI": ("BREASTAI", "127.0.0.1", port)})
    env = {"BREASTAI_QUEUE": "rabbitmq", "BREASTAI_AMQP_URL": rabbitmq_url, "BREASTAI_QUEUE_NAME": queue_name}
    common = ["--spool-dir", str(tmp_path / "spool"), "--destination", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"]
    worker = service_factory("work", [*common, "--metrics-port", str(work_metrics)], env)
    listener = service_factory(
        "listen", [*common, "--port", str(port), "--quiet-period", "1", "--metrics-port", str(listen_metrics)], env
    )
    listener.wait_for_echo(port)
    study_uid, ids, sources = _upload_study(pacs, sample_study)

    pacs.send_to_modality("BREASTAI", ids)
    expected_overlays = len(sources) * len(default_families())
    wait_for_results(pacs, study_uid, expected_overlays, "results via RabbitMQ")
    assert worker.process is not None and worker.process.poll() is None
    # The last object reaches the PACS just before the job is acknowledged and counted.
    pacs.wait_for(
        lambda: _metric(work_metrics, "breastai_jobs_done_total") == 1,
        timeout=30,
        interval=0.5,
        message="job counted as done",
    )


def test_an_instance_routed_after_the_report_gives_one_revision_that_names_it(
    orthanc_factory, service_factory, free_ports, sample_study: Path, tmp_path: Path
) -> None:
    # Issue 37: a series routed an hour later gives one revised report over the whole study, naming its predecessor
    # (PS3.3 C.17.2), not a second opinion over the new image alone.
    from pynetdicom import AE

    pacs, _service, port, _metrics = start_pacs_and_service(orthanc_factory, service_factory, free_ports, tmp_path)
    study_uid, ids, sources = _upload_study(pacs, sample_study)
    families = len(default_families())
    pacs.send_to_modality("BREASTAI", ids)
    wait_for_results(pacs, study_uid, len(sources) * families, "first report")
    (first,) = instances_of_class(pacs, study_uid, SR_CLASS)
    first_uid = str(download(pacs, first).SOPInstanceUID)

    later = pydicom.dcmread(next(iter(sorted(sample_study.glob("*.dcm")))))
    later.SOPInstanceUID = pydicom.uid.generate_uid()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(later.SOPClassUID, str(later.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="BREASTAI")
    assert assoc.send_c_store(later).Status == 0x0000
    assoc.release()
    pacs.wait_for(
        lambda: len(instances_of_class(pacs, study_uid, SR_CLASS)) == 2,
        timeout=RESULT_TIMEOUT_S,
        interval=0.5,
        message="revised report",
    )
    revision = next(
        download(pacs, item) for item in instances_of_class(pacs, study_uid, SR_CLASS) if item["ID"] != first["ID"]
    )
    predecessors = [
        str(instance.ReferencedSOPInstanceUID)
        for study in revision.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]
    assert predecessors == [first_uid]
    assert evidence_uids(revision) == sources | {str(later.SOPInstanceUID)}, "the revision covers the whole study"
    # Overlays of the earlier images came out again with the same UIDs: one copy each, plus the new image's.
    pacs.wait_for(
        lambda: len(instances_of_class(pacs, study_uid, SC_CLASS)) == (len(sources) + 1) * families,
        timeout=RESULT_TIMEOUT_S,
        interval=0.5,
        message="overlays of the whole study, once each",
    )
    path = tmp_path / "revision.dcm"
    revision.save_as(path)
    assert dciodvfy_errors(path) == []
