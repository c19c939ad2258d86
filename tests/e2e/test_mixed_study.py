"""One study of several kinds through a real Orthanc (issue 36): a B-mode image, a vendor's colour Doppler image and an
ABVS volume twice, as a US Multi-frame image from the scanner and as an Enhanced US Volume that places its frames in a
Frame of Reference. Each analysis whose input is present runs; the report names what was not analysed and why, places
the US Multi-frame's lesion by frame and the Enhanced US Volume's in its Frame of Reference (SCOORD3D)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.e2e.results import (
    SEG_CLASS,
    SR_CLASS,
    content_texts,
    dciodvfy_errors,
    download,
    instances_of_class,
    start_pacs_and_service,
    wait_for_results,
)
from tests.e2e.test_abvs_volume import LESION_FRAMES, _items_of_type, _referenced_frames, _volume

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_b_mode_colour_doppler_and_abvs_in_one_study_give_one_report_naming_what_was_not_analysed(
    orthanc_factory, service_factory, free_ports, tmp_path: Path
) -> None:
    doppler_file = get_testdata_file("US1_UNCR.dcm")  # GE power Doppler, RGB, no colour flag in its header
    if doppler_file is None:
        pytest.skip("pydicom-data's US1_UNCR.dcm is not available")
    volume = pydicom.dcmread(_volume(tmp_path / "abvs.dcm"))
    enhanced = pydicom.dcmread(_volume(tmp_path / "abvs-enhanced.dcm", enhanced=True))
    b_mode = pydicom.dcmread(ROOT / "samples" / "study2" / "breast_case007.dcm")
    doppler = pydicom.dcmread(doppler_file)
    for ds in (b_mode, doppler, enhanced):  # one patient, one study
        ds.StudyInstanceUID, ds.PatientID, ds.PatientName = (
            volume.StudyInstanceUID,
            volume.PatientID,
            volume.PatientName,
        )
    b_mode.SeriesInstanceUID = pydicom.uid.generate_uid()
    enhanced.SeriesInstanceUID = pydicom.uid.generate_uid()
    files = []
    for name, ds in (("abvs", volume), ("abvs_enhanced", enhanced), ("b_mode", b_mode), ("doppler", doppler)):
        path = tmp_path / f"{name}-send.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)

    pacs, _service, _port, _metrics = start_pacs_and_service(orthanc_factory, service_factory, free_ports, tmp_path)
    pacs.send_to_modality("BREASTAI", [pacs.upload(path) for path in files])
    wait_for_results(pacs, str(volume.StudyInstanceUID), overlays=1, message="results of the mixed study")

    (item,) = instances_of_class(pacs, str(volume.StudyInstanceUID), SR_CLASS)
    report = download(pacs, item)
    texts = content_texts(report)
    not_analysed = [t for t in texts if t.startswith("Not analysed:")]
    assert len(not_analysed) == 1 and "colour Doppler" in not_analysed[0], not_analysed
    assert any(frame in LESION_FRAMES for frame in _referenced_frames(report)), "the volume's lesion, by frame"
    placed = {str(region.ReferencedFrameOfReferenceUID) for region in _items_of_type(report, "SCOORD3D")}
    assert placed == {str(enhanced.FrameOfReferenceUID)}, "the Enhanced US Volume's lesions, in its Frame of Reference"
    assert instances_of_class(pacs, str(volume.StudyInstanceUID), SEG_CLASS)
    path = tmp_path / "report.dcm"
    report.save_as(path)
    assert dciodvfy_errors(path) == []
