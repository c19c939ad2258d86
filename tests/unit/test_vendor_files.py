"""Real vendor ultrasound files (pydicom test files and pydicom-data) end to end.

Each file goes through read_frames, render_overlay, build_overlay_image and
build_report with a fabricated analysis (one small square lesion on the
scan-region crop); the results must be dciodvfy-clean. The grayscale frame
is also checked against an independent reduction of the decoded pixels.
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, pixel_array

from tests.dicom_factory import dciodvfy_errors, square_lesion_analysis
from workers.dicom_reader import read_frames
from workers.overlay_render import render_overlay
from workers.sc_writer import build_overlay_image
from workers.sr_writer import AnalysedFrame, ReportContext, build_report
from workers.uids import derive_uid

# name: what the file exercises (from its header)
VENDOR_FILES = {
    "US1_UNCR.dcm": "GE, RGB, uncompressed",
    "US1_J2KR.dcm": "GE, YBR_RCT, JPEG 2000 lossless",
    "ExplVR_BigEnd.dcm": "GE, RGB, explicit VR big endian",
    "examples_ybr_color.dcm": "SonoSite, YBR_FULL_422, JPEG baseline, multi-frame (30)",
    "color3d_jpeg_baseline.dcm": "SonoSite, YBR_FULL_422, JPEG baseline, multi-frame (120)",
    "OBXXXX1A.dcm": "Philips, PALETTE COLOR, uncompressed, US regions",
    "OBXXXX1A_rle_2frame.dcm": "Philips, PALETTE COLOR, RLE lossless, multi-frame",
    "gdcm-US-ALOKA-16.dcm": "ALOKA, PALETTE COLOR with 16-bit LUT, implicit VR",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "Philips, MONOCHROME2, JPEG lossless SV1",
}


def _path(name: str) -> pathlib.Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"{name} not available (pydicom-data missing?)")
    return pathlib.Path(str(found))


def _reference_gray(path: pathlib.Path, frame_number: int | None) -> np.ndarray:
    """Independent grayscale: Y of the raw YBR data, or luma of RGB/LUT output."""
    ds = pydicom.dcmread(path)
    index = None if frame_number is None else frame_number - 1
    photometric = ds.PhotometricInterpretation
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        return pixel_array(ds, index=index, raw=True)[..., 0].astype(float)
    decoded = pixel_array(ds, index=index)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(decoded, ds).astype(float)
        if rgb.max() > 255:
            rgb = rgb / 256.0
        return rgb @ np.array([0.299, 0.587, 0.114])
    if decoded.ndim == 3:
        return decoded.astype(float) @ np.array([0.299, 0.587, 0.114])
    return decoded.astype(float)


@pytest.mark.parametrize("name", sorted(VENDOR_FILES))
def test_read_frames_gives_a_sensible_gray_frame(name: str) -> None:
    path = _path(name)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    [frame] = read_frames(path)
    assert frame.pixels.dtype == np.uint8
    assert frame.pixels.shape == (header.Rows, header.Columns)
    assert frame.pixels.std() > 5, "a flat frame means the decoding went wrong"
    frames = int(header.get("NumberOfFrames", 1) or 1)
    assert frame.frame_number == (frames // 2 + 1 if frames > 1 else None)
    x, y, w, h = frame.scan_region_xywh
    assert w > 0 and h > 0 and x + w <= header.Columns and y + h <= header.Rows
    difference = np.abs(frame.pixels.astype(float) - _reference_gray(path, frame.frame_number))
    assert difference.mean() < 1.5


def test_ultrasound_region_spacing_of_a_philips_file() -> None:
    [frame] = read_frames(_path("OBXXXX1A.dcm"))
    # Region 1 (2D): X0 120, Y0 60, X1 800 (clipped to 799), Y1 518; delta 0.02622878766 cm.
    assert frame.scan_region_xywh == (120, 60, 680, 459)
    assert frame.row_spacing_mm == pytest.approx(0.2622878766)
    assert frame.column_spacing_mm == pytest.approx(0.2622878766)


@pytest.mark.parametrize("name", sorted(VENDOR_FILES))
def test_results_from_vendor_files_are_valid(name: str, tmp_path: pathlib.Path) -> None:
    path = _path(name)
    [frame] = read_frames(path)
    x, y, w, h = frame.scan_region_xywh
    analysis = square_lesion_analysis((h, w), size=max(4, min(w, h) // 6), probability=0.42)

    overlay = render_overlay(frame.pixels, analysis, (x, y))
    assert overlay.shape == (*frame.pixels.shape, 3) and overlay.dtype == np.uint8

    sc = build_overlay_image(frame, analysis, derive_uid("sc-series", name), derive_uid("sc", name), 1, ReportContext())
    sr = build_report(
        [AnalysedFrame(frame, analysis)],
        [frame.dataset],
        derive_uid("sr-series", name),
        derive_uid("sr", name),
        ReportContext(),
    )
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == frame.study_instance_uid
    sc_path, sr_path = tmp_path / "sc.dcm", tmp_path / "sr.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools dciodvfy not installed")
    assert dciodvfy_errors(sc_path) == []
    assert dciodvfy_errors(sr_path) == []
