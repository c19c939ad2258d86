"""Mammograms end to end (issue 36): a vendor-like full-field image through ``breastai analyze``, and a two-view
study sent by a real Orthanc to ``breastai serve`` that comes back as SR, overlays and SEG.

The images are mini-MIAS films (development datasets) rewritten as vendors write full-field digital mammograms:
Digital Mammography X-Ray For Presentation, 12 bits in 16, MONOCHROME1, a sigmoid VOI LUT, JPEG Lossless
(dcmtk's dcmcjpeg), 3000 x 2400 at 0.1 mm. Without the datasets a synthetic film stands in (its findings are then
whatever the finder makes of it, which the tests accept as long as the report says so).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from tests.dicom_factory import make_mg_dataset
from tests.e2e.results import (
    SC_CLASS,
    SEG_CLASS,
    SR_CLASS,
    SYSTEM_PATH,
    content_texts,
    dciodvfy_errors,
    download,
    instances_of_class,
    start_pacs_and_service,
    wait_for_results,
)
from tests.training_data import development_datasets

ROOT = Path(__file__).resolve().parents[2]
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
MIAS_IMAGE = "mdb023"  # a malignant circumscribed mass (mini-MIAS labels)
MAMMOGRAPHY_CAD_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.50"


def _film() -> np.ndarray:
    """A mini-MIAS film (512 x 512, 0.4 mm, chest wall at the right edge) as uint8, or a synthetic one like it."""
    path = development_datasets() / "mias" / "images" / f"{MIAS_IMAGE}.png"
    if path.is_file():
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert image is not None
        return image
    yy, xx = np.mgrid[0:512, 0:512]
    breast = (((511 - xx) / 330.0) ** 2 + ((yy - 256) / 240.0) ** 2 < 1).astype(np.float32) * 120
    mass = (((xx - 350) ** 2 + (yy - 250) ** 2) < 30**2).astype(np.float32) * 90
    return np.clip(breast + mass + np.random.default_rng(0).normal(0, 6, (512, 512)), 0, 255).astype(np.uint8)


def vendor_mammogram(path: Path, *, study_uid: str, laterality: str, view: str) -> Path:
    """Write the film as a vendor's full-field mammogram of one breast.

    3000 x 2400 at 0.1 mm (the 0.4 mm film upscaled 4x against the chest-wall edge of the detector), 12 bits
    MONOCHROME1 with a sigmoid VOI LUT, JPEG Lossless; a left breast is stored with its chest wall at the left edge
    (Patient Orientation A\\R), a right one at the right edge (P\\L), as the film is flipped to be.
    """
    film = _film()
    chest_wall_left = laterality == "L"
    if chest_wall_left:
        film = film[:, ::-1]
    rows, columns = 3000, 2400
    scaled = cv2.resize(film, (film.shape[1] * 4, film.shape[0] * 4), interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((rows, columns), dtype=np.uint8)
    top = (rows - scaled.shape[0]) // 2
    left = 0 if chest_wall_left else columns - scaled.shape[1]
    canvas[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
    # MONOCHROME1: dense tissue has low values; 12 bits stored.
    stored = (4095 - canvas.astype(np.uint16) * 16).astype(np.uint16)
    ds = make_mg_dataset(stored, study_uid=study_uid, laterality=laterality, view=view, imager_spacing_mm=0.1)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 4096, "SIGMOID"
    ds.PatientOrientation = ["A", "R"] if chest_wall_left else ["P", "L"]
    ds.Manufacturer, ds.ManufacturerModelName = "GE MEDICAL SYSTEMS", "Senographe Essential"
    ds.PatientID, ds.PatientName = "MGSAMPLE1", "ANON^MAMMO"
    plain = path.with_suffix(".raw.dcm")
    ds.save_as(plain, enforce_file_format=True)
    dcmcjpeg = shutil.which("dcmcjpeg", path=SYSTEM_PATH)
    assert dcmcjpeg, "dcmtk's dcmcjpeg is required (make deps-system)"
    subprocess.run([dcmcjpeg, "+e1", str(plain), str(path)], check=True, capture_output=True, timeout=120)
    plain.unlink()
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == JPEG_LOSSLESS_SV1
    return path


def _breastai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_analyze_reports_a_mammography_finding_or_says_there_is_none(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    vendor_mammogram(inputs / "l_cc.dcm", study_uid=pydicom.uid.generate_uid(), laterality="L", view="CC")

    result = _breastai("analyze", str(inputs), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "no pipeline" not in result.stderr and "not analysed" not in result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    by_class: dict[str, list[Path]] = {}
    for path in written:
        by_class.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID), []).append(path)
    (report_path,) = by_class[SR_CLASS]
    report = pydicom.dcmread(report_path)
    texts = content_texts(report)
    assert "Mammography" in texts, "the procedure reported names mammography"
    findings = [t for t in texts if t.startswith("Lesion ")]
    if findings:
        assert "Certainty of Finding" in texts and "Morphologically abnormal structure" in texts
        assert len(by_class.get(SEG_CLASS, [])) == 1, "one SEG for the analysed image with findings"
    else:
        assert "No lesion detected" in texts, "an image without findings is reported as such"
    assert "Left" in texts, "the finding site carries the image's laterality"
    assert len(by_class[SC_CLASS]) >= 1
    (cad_path,) = by_class[MAMMOGRAPHY_CAD_SR_CLASS]  # the same findings as a Mammography CAD SR (TID 4000)
    _check_cad_report(pydicom.dcmread(cad_path), images=1, findings=len(findings))
    for path in written:
        assert dciodvfy_errors(path) == [], path


def test_a_two_view_mammography_study_from_orthanc_comes_back_with_report_overlays_and_segmentation(
    orthanc_factory, service_factory, free_ports, tmp_path: Path
) -> None:
    pacs, _service, _port, _metrics = start_pacs_and_service(orthanc_factory, service_factory, free_ports, tmp_path)
    study_uid = pydicom.uid.generate_uid()
    files = [
        vendor_mammogram(tmp_path / "l_cc.dcm", study_uid=study_uid, laterality="L", view="CC"),
        vendor_mammogram(tmp_path / "r_cc.dcm", study_uid=study_uid, laterality="R", view="CC"),
    ]
    ids = [pacs.upload(path) for path in files]
    pacs.send_to_modality("BREASTAI", ids)
    wait_for_results(pacs, study_uid, overlays=len(files), message="mammography results in Orthanc")

    (report_item,) = instances_of_class(pacs, study_uid, SR_CLASS)
    report = download(pacs, report_item)
    texts = content_texts(report)
    assert "Mammography" in texts and {"Left", "Right"} <= set(texts)
    lesion_groups = [t for t in texts if t.startswith("Lesion ")]
    empty_images = texts.count("No lesion detected")
    assert lesion_groups or empty_images == len(files)
    segmentations = instances_of_class(pacs, study_uid, SEG_CLASS)
    images_with_findings = len(files) - empty_images
    assert len(segmentations) == images_with_findings
    sources = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    for item in segmentations:
        seg = download(pacs, item)
        assert str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID) in sources
        seg_path = tmp_path / f"{seg.SOPInstanceUID}.dcm"
        seg.save_as(seg_path)
        assert dciodvfy_errors(seg_path) == []
    report_path = tmp_path / "report.dcm"
    report.save_as(report_path)
    assert dciodvfy_errors(report_path) == []
    # Sent before the main report, so in Orthanc once the report is.
    (cad_item,) = instances_of_class(pacs, study_uid, MAMMOGRAPHY_CAD_SR_CLASS)
    cad = download(pacs, cad_item)
    _check_cad_report(cad, images=len(files), findings=len(lesion_groups))
    cad_path = tmp_path / "cad.dcm"
    cad.save_as(cad_path)
    assert dciodvfy_errors(cad_path) == []


def _check_cad_report(cad: pydicom.Dataset, images: int, findings: int) -> None:
    """A Mammography CAD Report with an Image Library entry per mammogram and one finding per lesion of the SR."""
    assert cad.ConceptNameCodeSequence[0].CodeMeaning == "Mammography CAD Report"
    top = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in cad.ContentSequence}
    assert len(top["Image Library"].ContentSequence) == images
    summary = top["CAD Processing and Findings Summary"]
    assert len(summary.get("ContentSequence") or []) == findings


pytestmark = pytest.mark.integration


def test_a_study_with_ultrasound_and_mammography_of_one_breast_reports_both_and_their_late_fusion(
    orthanc_factory, service_factory, free_ports, tmp_path: Path
) -> None:
    # Issue 36: both branches run; the SR gives DL-U, DL-M and their late fusion (mean log-odds), named as such.
    mammogram = vendor_mammogram(tmp_path / "l_cc.dcm", study_uid=pydicom.uid.generate_uid(), laterality="L", view="CC")
    header = pydicom.dcmread(mammogram, stop_before_pixels=True)
    ultrasound = pydicom.dcmread(ROOT / "samples" / "study1" / "busbra_0004-l.dcm")
    assert ultrasound.ImageLaterality == "L"
    ultrasound.StudyInstanceUID = header.StudyInstanceUID
    ultrasound.PatientID, ultrasound.PatientName = header.PatientID, header.PatientName
    ultrasound.save_as(tmp_path / "us_left.dcm", enforce_file_format=True)

    pacs, _service, _port, _metrics = start_pacs_and_service(orthanc_factory, service_factory, free_ports, tmp_path)
    pacs.send_to_modality("BREASTAI", [pacs.upload(path) for path in (mammogram, tmp_path / "us_left.dcm")])
    study_uid = str(header.StudyInstanceUID)
    wait_for_results(pacs, study_uid, overlays=2, message="US and MG results in Orthanc")
    (item,) = instances_of_class(pacs, study_uid, SR_CLASS)
    report = download(pacs, item)
    texts = content_texts(report)
    assert {"Ultrasonography of breast", "Mammography"} <= set(texts)
    images_with_findings = texts.count("Lesion 1")
    if images_with_findings == 2:  # a US lesion and an MG finding of the left breast
        assert "Left breast: ultrasound and mammography" in texts
        assert "DL-UM late fusion (mean log-odds)" in texts
    else:
        assert "Left breast: ultrasound and mammography" not in texts
    report_path = tmp_path / "report.dcm"
    report.save_as(report_path)
    assert dciodvfy_errors(report_path) == []
