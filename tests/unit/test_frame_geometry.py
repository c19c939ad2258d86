"""workers.frame_geometry and the report's SCOORD3D: a lesion on a frame of an enhanced volume placed in its Frame of
Reference (issue 36), every other image keeping SCOORD on its own pixels."""

from __future__ import annotations

import copy
import pathlib
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.dicom_factory import (
    dciodvfy_errors,
    make_us_dataset,
    make_us_volume_dataset,
    square_lesion_analysis,
    synthetic_breast_image,
    write_dataset,
)
from workers.dicom_reader import read_frames
from workers.frame_geometry import frame_plane
from workers.sr_writer import AnalysedFrame, ReportContext, build_report

SR_SERIES = "1.2.826.0.1.3680043.8.498.12"
SR_SOP = "1.2.826.0.1.3680043.8.498.13"
FRAMES = 6


def _volume() -> Dataset:
    frames = np.stack([synthetic_breast_image(120, 160, seed=s) for s in range(FRAMES)])
    return make_us_volume_dataset(frames, spacing_mm=0.2, slice_step_mm=0.5, origin_mm=(-40.0, 0.0, 25.0))


def test_each_frame_lies_one_step_further_along_the_sweep() -> None:
    ds = _volume()
    first, fourth = frame_plane(ds, 1), frame_plane(ds, 4)
    assert first is not None and fourth is not None
    assert first.frame_of_reference_uid == ds.FrameOfReferenceUID
    assert fourth.image_position == (-40.0, 0.0, 26.5)
    assert fourth.pixel_spacing == (0.2, 0.2)
    # (0, 0) is the corner of the first pixel, half a pixel before its centre (Image Position); (10.5, 20.5) the
    # centre of pixel (column 10, row 20).
    placed = fourth.to_reference([[0.0, 0.0], [10.5, 20.5]])
    np.testing.assert_allclose(placed, [[-40.1, -0.1, 26.5], [-40.0 + 10 * 0.2, 20 * 0.2, 26.5]], atol=1e-9)


def test_a_per_frame_group_wins_over_the_shared_one() -> None:
    ds = _volume()
    tilted = Dataset()
    tilted.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence = [tilted]
    third, second = frame_plane(ds, 3), frame_plane(ds, 2)
    assert third is not None and second is not None
    assert third.image_orientation == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    assert second.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _without_frame_of_reference(ds: Dataset) -> None:
    del ds.FrameOfReferenceUID


def _skewed(ds: Dataset) -> None:
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0.5, 1, 0]


def _no_spacing(ds: Dataset) -> None:
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence


def _text_position(ds: Dataset) -> None:
    ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].add_new(0x00200032, "LO", "left")


@pytest.mark.parametrize("damage", [_without_frame_of_reference, _skewed, _no_spacing, _text_position])
def test_a_header_that_does_not_place_the_frame_gives_no_plane(damage: object) -> None:
    ds = _volume()
    damage(ds)  # type: ignore[operator]
    assert frame_plane(ds, 1) is None


def test_ultrasound_without_functional_groups_has_no_plane() -> None:
    multi = make_us_dataset(np.stack([synthetic_breast_image(seed=s) for s in range(3)]))
    multi.FrameOfReferenceUID = pydicom.uid.generate_uid()
    assert frame_plane(multi, 2) is None
    assert frame_plane(make_us_dataset(synthetic_breast_image()), None) is None


def _scoords(dataset: Dataset, value_type: str) -> list[Dataset]:
    found = []
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == value_type:
            found.append(item)
        found.extend(_scoords(item, value_type))
    return found


def test_a_lesion_on_a_volume_frame_is_reported_as_scoord3d(tmp_path: pathlib.Path) -> None:
    path = write_dataset(_volume(), tmp_path / "volume.dcm")
    frame = read_frames(path)[0]  # the middle frame, as the reader picks one frame of a loop
    assert frame.frame_number is not None
    assert (frame.row_spacing_mm, frame.column_spacing_mm) == (0.2, 0.2)  # from Pixel Measures
    analysis = square_lesion_analysis(frame.pixels.shape, size=20)
    evidence = [pydicom.dcmread(path, stop_before_pixels=True)]
    sr = build_report([AnalysedFrame(frame, analysis)], evidence, SR_SERIES, SR_SOP, ReportContext())

    assert _scoords(sr, "SCOORD") == []
    (region,) = _scoords(sr, "SCOORD3D")
    assert region.GraphicType == "POLYGON"
    assert region.ReferencedFrameOfReferenceUID == evidence[0].FrameOfReferenceUID
    points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 3)
    np.testing.assert_array_equal(points[0], points[-1])
    # On the frame's plane (z of its position), inside the frame's extent in x and y.
    assert np.allclose(points[:, 2], 25.0 + (frame.frame_number - 1) * 0.5)
    x0, y0, w, h = frame.scan_region_xywh
    assert points[:, 0].min() >= -40.1 + 0.2 * x0 and points[:, 0].max() <= -40.1 + 0.2 * (x0 + w)
    assert points[:, 1].min() >= -0.1 + 0.2 * y0 and points[:, 1].max() <= -0.1 + 0.2 * (y0 + h)
    if shutil.which("dciodvfy") is not None:
        out = tmp_path / "sr.dcm"
        sr.save_as(out, enforce_file_format=True)
        assert dciodvfy_errors(out) == []


def test_the_same_lesion_on_plain_ultrasound_stays_scoord(tmp_path: pathlib.Path) -> None:
    volume = _volume()
    plain = copy.deepcopy(volume)
    del plain.SharedFunctionalGroupsSequence, plain.PerFrameFunctionalGroupsSequence
    path = write_dataset(plain, tmp_path / "plain.dcm")
    frame = read_frames(path)[0]
    analysis = square_lesion_analysis(frame.pixels.shape, size=20)
    sr = build_report(
        [AnalysedFrame(frame, analysis)],
        [pydicom.dcmread(path, stop_before_pixels=True)],
        SR_SERIES,
        SR_SOP,
        ReportContext(),
    )
    assert _scoords(sr, "SCOORD3D") == []
    (region,) = _scoords(sr, "SCOORD")
    (image,) = region.ContentSequence[0].ReferencedSOPSequence
    assert int(image.ReferencedFrameNumber) == frame.frame_number
