"""No patient identity in anything the service writes besides the images and results themselves (issue 37).

A study with distinctive identities goes through a real Orthanc and `breastai serve`, together with a stray
instance of another patient (refused at the door) and one the reader refuses; then the service's log, its
/metrics and health answers, and every file it wrote in the spool that is not a DICOM instance (job files, the
messages a queue would carry, dead-letter reasons, its records, the audit trail) are searched for the names, IDs
and birth dates.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage  # type: ignore[attr-defined]

from models.inference.pipeline import default_families
from tests.e2e.results import RESULT_TIMEOUT_S, start_pacs_and_service, wait_for_results

IDENTITY = {
    "PatientName": "ZZQUILL^HEPZIBAH",
    "PatientID": "PHI-MRN-998877",
    "PatientBirthDate": "19450317",
    "OtherPatientIDs": "PHI-OTHER-5511",
}
STRAY = {"PatientName": "YYWOMBAT^ESMERALDA", "PatientID": "PHI-MRN-112233", "PatientBirthDate": "19601111"}


def _with_identity(path: Path, target: Path, identity: dict[str, str]) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in identity.items():
        setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_patient_identity_reaches_no_log_metric_queue_message_or_spool_record(
    orthanc_factory: Callable[..., Any],
    service_factory: Callable[..., Any],
    free_ports: Callable[[int], list[int]],
    sample_study: Path,
    tmp_path: Path,
) -> None:
    pacs, service, port, metrics_port = start_pacs_and_service(orthanc_factory, service_factory, free_ports, tmp_path)
    sources = sorted(sample_study.glob("*.dcm"))
    marked = tmp_path / "marked"
    marked.mkdir()
    files = [_with_identity(path, marked / path.name, IDENTITY) for path in sources]
    ids = [pacs.upload(path) for path in files]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    pacs.send_to_modality("BREASTAI", ids)
    wait_for_results(pacs, study_uid, len(files) * len(default_families()), "results in Orthanc")
    # Then two bad instances over a direct association: another patient's image of the same study (refused at the
    # door), and, in a study of its own, one whose pixel data is cut short (accepted, then dead-lettered by the worker
    # with its reason).
    stray = pydicom.dcmread(files[0])
    for keyword, value in STRAY.items():
        setattr(stray, keyword, value)
    stray.SOPInstanceUID = pydicom.uid.generate_uid()
    short = pydicom.dcmread(files[0])
    short.SOPInstanceUID = pydicom.uid.generate_uid()
    short.StudyInstanceUID = pydicom.uid.generate_uid()  # a study of nothing readable: dead-lettered whole
    short.PixelData = short.PixelData[:100]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(UltrasoundImageStorage, str(short.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="BREASTAI")
    statuses = [int(assoc.send_c_store(ds).Status) for ds in (stray, short)]
    assoc.release()
    assert statuses == [0xC212, 0x0000]

    spool = tmp_path / "spool"
    pacs.wait_for(
        lambda: any((spool / "dead").iterdir()), timeout=RESULT_TIMEOUT_S, interval=0.5, message="dead letter"
    )
    written = {"service log": service.log()}
    for path in ("/metrics", "/health/ready", "/health/live"):
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=5) as response:
            written[path] = response.read().decode()
    for path in spool.rglob("*"):
        if not path.is_file() or path.name == ".reserve":
            continue
        data = path.read_bytes()
        if data[128:132] == b"DICM":
            continue  # the images and the delivered SR: patient data by design, kept only in the spool
        written[str(path.relative_to(spool))] = data.decode(errors="replace")
    assert any(name.endswith("reason.txt") for name in written), "the dead letter's reason was searched"
    assert any(name.startswith("received") for name in written), sorted(written)
    leaks = {
        name: value
        for name, text in written.items()
        for value in (*IDENTITY.values(), *STRAY.values(), "HEPZIBAH", "ESMERALDA", "1945-03-17")
        if value in text
    }
    assert leaks == {}
