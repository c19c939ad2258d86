"""An ABVS volume end to end (issue 36): lesions tracked through the transverse frames and reported on their
largest section, the report placing each in the volume: by frame number (SCOORD on the frame) for a US Multi-frame
image, by patient coordinates in its Frame of Reference (SCOORD3D) for an Enhanced US Volume that places its frames.

No public ABVS volume exists: the volume is built from a real 2D lesion image (the BrEaST sample, malignant), its
lesion present on frames 21-40 of 60 and painted out of the others (OpenCV inpainting over the segmenter's own
outline, so the segmenter has nothing to find there).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from models.inference.pipeline import load_bmode_pipeline
from models.inference.three_plane import load_three_plane_scorer
from tests.dicom_factory import make_us_dataset, make_us_volume_dataset, write_dataset
from tests.e2e.results import SR_CLASS, content_texts, dciodvfy_errors

ROOT = Path(__file__).resolve().parents[2]
FRAMES = 60
LESION_FRAMES = range(21, 41)  # 1-based frame numbers holding the lesion
SLICE_STEP_MM, FIRST_Z_MM = 0.5, 25.0  # the Enhanced US Volume's sweep: frame n at z = 25 + (n - 1) * 0.5 mm

pytestmark = pytest.mark.integration


def _volume(path: Path, enhanced: bool = False) -> Path:
    source = pydicom.dcmread(ROOT / "samples" / "study2" / "breast_case007.dcm")
    image = source.pixel_array.astype(np.uint8)
    components = load_bmode_pipeline().segment(image)
    assert components, "the sample's lesion is found on the 2D image"
    mask = np.zeros(image.shape, np.uint8)
    for component in components:
        mask[component.mask] = 255
    mask = cv2.dilate(mask, np.ones((15, 15), np.uint8))
    without = cv2.inpaint(image, mask, 9, cv2.INPAINT_TELEA)
    rng = np.random.default_rng(7)
    # Each frame its own speckle, as a sweep's neighbouring slices differ.
    frames = np.stack(
        [
            np.clip((image if number in LESION_FRAMES else without) + rng.normal(0, 4, image.shape), 0, 255)
            for number in range(1, FRAMES + 1)
        ]
    ).astype(np.uint8)
    study_uid = str(source.StudyInstanceUID)
    ds = (
        make_us_volume_dataset(frames, study_uid=study_uid, slice_step_mm=SLICE_STEP_MM, origin_mm=(0, 0, FIRST_Z_MM))
        if enhanced
        else make_us_dataset(frames, study_uid=study_uid, spacing_mm=None)
    )
    ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "ACUSON S2000 ABVS"
    ds.PatientID, ds.PatientName = source.PatientID, source.PatientName
    ds.ImageLaterality = "L"
    return write_dataset(ds, path)


@pytest.mark.parametrize("enhanced", [False, True], ids=["us-multiframe", "enhanced-us-volume"])
def test_an_abvs_volume_gets_its_lesion_placed_in_a_report(tmp_path: Path, enhanced: bool) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = _volume(inputs / "abvs.dcm", enhanced)

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "analyze", str(inputs), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "not analysed" not in result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    (report_path,) = [p for p in written if str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) == SR_CLASS]
    report = pydicom.dcmread(report_path)
    texts = content_texts(report)
    assert "Lesion 1" in texts
    three_plane = load_three_plane_scorer()
    if three_plane is not None:  # the three-plane family scores each tracked lesion beside the B-mode families
        assert three_plane.model_info.name in texts
    # The lesion is placed on a frame of its own stretch; what the segmenter may take for a lesion in the painted-out
    # texture elsewhere is reported too (as it would be on a 2D image), never merged with it.
    if enhanced:
        frame_of_reference = str(pydicom.dcmread(volume, stop_before_pixels=True).FrameOfReferenceUID)
        regions = _items_of_type(report, "SCOORD3D")
        assert regions and not _items_of_type(report, "SCOORD")
        assert {str(region.ReferencedFrameOfReferenceUID) for region in regions} == {frame_of_reference}
        lesion_z = [FIRST_Z_MM + (n - 1) * SLICE_STEP_MM for n in LESION_FRAMES]
        planes = [float(np.asarray(region.GraphicData).reshape(-1, 3)[0, 2]) for region in regions]
        assert any(min(lesion_z) <= z <= max(lesion_z) for z in planes), f"lesions placed at z {planes}"
    else:
        frames = _referenced_frames(report)
        assert any(frame in LESION_FRAMES for frame in frames), f"lesions placed on frames {frames}"
        # The real lesion, which spans 20 frames, is outlined on the sagittal plane through it as well.
        on_lesion = [
            _sagittal_checks(group)
            for group in _items_of_type(report, "CONTAINER")
            if any(frame in LESION_FRAMES for frame in _referenced_frames(group)) and _sagittal_checks(group)
        ]
        assert ["Yes"] in on_lesion, on_lesion
    # Every tracked lesion was looked for on the sagittal plane reconstructed through it, and the report says so.
    checks = _sagittal_checks(report)
    assert len(checks) == len([text for text in texts if re.fullmatch(r"Lesion \d+", text)])
    assert set(checks) <= {"Yes", "No"}
    print(f"reconstructed sagittal plane: {checks}")
    source_uid = str(pydicom.dcmread(volume, stop_before_pixels=True).SOPInstanceUID)
    assert source_uid in _referenced_instances(report)
    assert dciodvfy_errors(report_path) == []
    print(f"ABVS volume of {FRAMES} frames analysed in {elapsed:.1f} s (process start included)")


def _referenced_frames(dataset: pydicom.Dataset) -> list[int]:
    found: list[int] = []
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == "SCOORD":
            for reference in item.get("ContentSequence", []):
                for image in reference.get("ReferencedSOPSequence", []):
                    numbers = image.get("ReferencedFrameNumber")
                    if numbers is not None:
                        found.extend(int(n) for n in (numbers if isinstance(numbers, list | tuple) else [numbers]))
        found.extend(_referenced_frames(item))
    return found


def _sagittal_checks(dataset: pydicom.Dataset) -> list[str]:
    return [
        str(item.ConceptCodeSequence[0].CodeMeaning)
        for item in _items_of_type(dataset, "CODE")
        if item.ConceptNameCodeSequence[0].get("CodeValue") == "SAGITTAL-CHECK"
    ]


def _items_of_type(dataset: pydicom.Dataset, value_type: str) -> list[pydicom.Dataset]:
    found: list[pydicom.Dataset] = []
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == value_type:
            found.append(item)
        found.extend(_items_of_type(item, value_type))
    return found


def _referenced_instances(dataset: pydicom.Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in dataset.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
