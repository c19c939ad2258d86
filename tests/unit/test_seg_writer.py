"""workers.seg_writer: lesion masks as a DICOM Segmentation, round-tripped through highdicom and dciodvfy."""

from __future__ import annotations

import copy
import pathlib
import shutil
import time

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from models.inference.findings import ModelInfo
from tests.dicom_factory import (
    MG_FOR_PRESENTATION_STORAGE,
    US_IMAGE_STORAGE,
    US_MULTIFRAME_IMAGE_STORAGE,
    dciodvfy_errors,
    make_mg_dataset,
    make_us_dataset,
    synthetic_breast_image,
    write_dataset,
)
from workers.dicom_reader import SourceFrame, read_frames
from workers.routing import BMODE_PIPELINE
from workers.seg_writer import SERIES_NUMBER, build_segmentation, segmentation_uids
from workers.sr_writer import ReportContext
from workers.uids import derive_uid

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY = "1.2.826.0.1.3680043.8.498.40"
SEGMENTER = ModelInfo("breastai-seg-unet", "1.2.0", "a" * 64)
MODEL_KEY = "breastai-seg-unet/1.2.0|breastai-cls-resnet/3.4.1"
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")


def _box(shape: tuple[int, int], y0: int, x0: int, y1: int, x1: int) -> npt.NDArray[np.bool_]:
    mask = np.zeros(shape, dtype=np.bool_)
    mask[y0:y1, x0:x1] = True
    return mask


def _two_masks(shape: tuple[int, int]) -> list[npt.NDArray[np.bool_]]:
    """Two disjoint lesions: a square and a disc."""
    rows, columns = shape
    yy, xx = np.mgrid[0:rows, 0:columns]
    disc = (yy - rows * 0.6) ** 2 + (xx - columns * 0.7) ** 2 <= (min(rows, columns) * 0.12) ** 2
    return [_box(shape, rows // 8, columns // 8, rows // 3, columns // 3), disc]


@pytest.fixture()
def us_frame(tmp_path: pathlib.Path) -> SourceFrame:
    ds = make_us_dataset(synthetic_breast_image(), study_uid=STUDY)
    return read_frames(write_dataset(ds, tmp_path / "us.dcm"))[0]


@pytest.fixture()
def multi_frames(tmp_path: pathlib.Path) -> list[SourceFrame]:
    stack = np.stack([synthetic_breast_image(seed=s) for s in range(5)])
    ds = make_us_dataset(stack, study_uid=STUDY, spacing_mm=None)
    return read_frames(write_dataset(ds, tmp_path / "multi.dcm"), max_frames=5)


@pytest.fixture()
def mg_frame(tmp_path: pathlib.Path) -> SourceFrame:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 4096, size=(320, 256), dtype=np.uint16)
    ds = make_mg_dataset(pixels, study_uid=STUDY, laterality="R", view="MLO")
    return read_frames(write_dataset(ds, tmp_path / "mg.dcm"))[0]


def _build(frame: SourceFrame, masks: list[npt.NDArray[np.bool_]], model_key: str = MODEL_KEY) -> hd.seg.Segmentation:
    labels = [f"Lesion {n}" for n in range(1, len(masks) + 1)]
    seg = build_segmentation(frame, masks, labels, SEGMENTER, ReportContext(), model_key)
    assert seg is not None
    return seg


def _round_trip(seg: hd.seg.Segmentation, path: pathlib.Path) -> hd.seg.Segmentation:
    seg.save_as(path, enforce_file_format=True)
    return hd.seg.segread(path)


def _masks_back(back: hd.seg.Segmentation, frame: SourceFrame) -> npt.NDArray[np.uint8]:
    """(rows, columns, segments) as read back for the source frame."""
    if frame.frame_number is None:
        pixels = back.get_pixels_by_source_instance([frame.sop_instance_uid])
    else:
        pixels = back.get_pixels_by_source_frame(frame.sop_instance_uid, [frame.frame_number])
    assert pixels.shape[0] == 1
    return np.asarray(pixels[0])


def _derivation_sources(seg: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [
        source
        for item in seg.PerFrameFunctionalGroupsSequence
        for derivation in item.DerivationImageSequence
        for source in derivation.SourceImageSequence
    ]


def _assert_round_trip(frame: SourceFrame, masks: list[npt.NDArray[np.bool_]], path: pathlib.Path) -> None:
    back = _round_trip(_build(frame, masks), path)
    assert back.SOPClassUID == SEGMENTATION_STORAGE and back.SegmentationType == "BINARY"
    assert back.BitsAllocated == 1
    assert len(back.SegmentSequence) == len(masks)
    stored = _masks_back(back, frame)
    assert stored.shape == (*masks[0].shape, len(masks))
    for index, mask in enumerate(masks):
        np.testing.assert_array_equal(stored[:, :, index].astype(bool), mask)
    # Every reference names the source instance, its class, and (multi-frame) its frame.
    references = [*back.SourceImageSequence, *_derivation_sources(back)]
    assert len(back.PerFrameFunctionalGroupsSequence) == len(masks)
    for reference in references:
        assert reference.ReferencedSOPInstanceUID == frame.sop_instance_uid
        assert reference.ReferencedSOPClassUID == frame.sop_class_uid
        if frame.frame_number is None:
            assert "ReferencedFrameNumber" not in reference
        else:
            assert int(reference.ReferencedFrameNumber) == frame.frame_number
    [series] = back.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == frame.series_instance_uid
    [instance] = series.ReferencedInstanceSequence
    assert instance.ReferencedSOPInstanceUID == frame.sop_instance_uid
    assert instance.ReferencedSOPClassUID == frame.sop_class_uid
    assert "ReferencedFrameNumber" not in instance  # Common Instance Reference: instance level only
    if shutil.which("dciodvfy") is not None:
        assert dciodvfy_errors(path) == []


def test_single_frame_us_round_trip(us_frame: SourceFrame, tmp_path: pathlib.Path) -> None:
    assert us_frame.sop_class_uid == US_IMAGE_STORAGE
    _assert_round_trip(us_frame, _two_masks(us_frame.pixels.shape), tmp_path / "seg.dcm")


def test_multi_frame_us_round_trip_references_the_frame(
    multi_frames: list[SourceFrame], tmp_path: pathlib.Path
) -> None:
    frame = multi_frames[2]
    assert frame.sop_class_uid == US_MULTIFRAME_IMAGE_STORAGE and frame.frame_number == 3
    _assert_round_trip(frame, _two_masks(frame.pixels.shape), tmp_path / "seg.dcm")
    # The caller's header is left as it was (highdicom is given a copy presented as single-frame).
    assert frame.dataset.SOPClassUID == US_MULTIFRAME_IMAGE_STORAGE


def test_mammogram_round_trip(mg_frame: SourceFrame, tmp_path: pathlib.Path) -> None:
    assert mg_frame.sop_class_uid == MG_FOR_PRESENTATION_STORAGE
    assert "PixelSpacing" not in mg_frame.dataset and "ImagerPixelSpacing" in mg_frame.dataset
    _assert_round_trip(mg_frame, _two_masks(mg_frame.pixels.shape), tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    assert back.FrameOfReferenceUID == mg_frame.dataset.FrameOfReferenceUID
    assert list(back.PatientOrientation) == list(mg_frame.dataset.PatientOrientation)
    # A 2D projection: no patient-space plane is invented, no pixel spacing from the detector plane.
    shared = back.SharedFunctionalGroupsSequence[0]
    assert "PlaneOrientationSequence" not in shared and "PixelMeasuresSequence" not in shared
    assert "PlanePositionSequence" not in back.PerFrameFunctionalGroupsSequence[0]
    [side] = back.SegmentSequence[0].AnatomicRegionSequence[0].AnatomicRegionModifierSequence
    assert (side.CodeValue, side.CodeMeaning) == ("24028007", "Right")


def test_pacs_facing_header(us_frame: SourceFrame) -> None:
    seg = build_segmentation(
        us_frame,
        _two_masks(us_frame.pixels.shape),
        ["Lesion 1", "Lesion 2"],
        SEGMENTER,
        ReportContext(institution_name="Test Hospital"),
        MODEL_KEY,
    )
    assert seg is not None
    source = us_frame.dataset
    assert seg.PatientID == source.PatientID == "TEST0001"
    assert str(seg.PatientName) == "ANON^TEST"
    assert seg.StudyInstanceUID == source.StudyInstanceUID == STUDY
    assert seg.AccessionNumber == source.AccessionNumber
    assert seg.Modality == "SEG" and seg.SeriesNumber == SERIES_NUMBER
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert "advisory" in seg.SeriesDescription
    assert seg.ContentLabel == "AI_ADVISORY"
    assert seg.ContentDescription == "AI result - not for diagnostic use: breastai-seg-unet 1.2.0"
    assert seg.ImageComments == (
        "AI result - not for diagnostic use. Lesion masks drawn by breastai-seg-unet 1.2.0;"
        " 2 segment(s): Lesion 1, Lesion 2."
    )
    assert seg.InstitutionName == "Test Hospital"
    assert seg.SegmentsOverlap == "NO"
    for number, segment in enumerate(seg.SegmentSequence, start=1):
        assert segment.SegmentNumber == number and segment.SegmentLabel == f"Lesion {number}"
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("4147007", "SCT", "Mass")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "breastai-seg-unet"
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("breastai-seg-unet", "1.2.0")
        assert segment.AnatomicRegionSequence[0].CodeValue == "76752008"  # Breast
        assert segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeMeaning == "Left"


def test_uids_are_derived_and_stable(us_frame: SourceFrame, multi_frames: list[SourceFrame]) -> None:
    masks = _two_masks(us_frame.pixels.shape)
    first, again = _build(us_frame, masks), _build(copy.deepcopy(us_frame), masks)
    other_model = _build(us_frame, masks, model_key="breastai-seg-unet/1.3.0|breastai-cls-resnet/3.4.1")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == segmentation_uids(us_frame, MODEL_KEY)
    assert first.SOPInstanceUID != other_model.SOPInstanceUID
    assert first.SeriesInstanceUID != other_model.SeriesInstanceUID
    # Frames of one loop: one series (the source's), one instance each.
    loop = [segmentation_uids(frame, MODEL_KEY) for frame in multi_frames]
    assert len({series for series, _ in loop}) == 1 and len({sop for _, sop in loop}) == len(multi_frames)
    # Never one of the report's or overlays' UIDs (workers.consumer's derivations for the same study and key).
    source = f"{us_frame.sop_instance_uid}#1"
    others = {
        derive_uid(STUDY, BMODE_PIPELINE, MODEL_KEY, "report-series"),
        derive_uid(STUDY, BMODE_PIPELINE, MODEL_KEY, "report", source),
        derive_uid(STUDY, BMODE_PIPELINE, MODEL_KEY, "overlay-series", "dlr_bm"),
        derive_uid(STUDY, BMODE_PIPELINE, MODEL_KEY, "overlay", "dlr_bm", source),
    }
    assert not others & {first.SeriesInstanceUID, first.SOPInstanceUID}


def test_no_masks_give_no_segmentation(us_frame: SourceFrame) -> None:
    assert build_segmentation(us_frame, [], [], SEGMENTER, ReportContext(), MODEL_KEY) is None


def test_bad_input_is_refused(us_frame: SourceFrame) -> None:
    shape = us_frame.pixels.shape
    good = _box(shape, 10, 10, 20, 20)
    with pytest.raises(ValueError, match="2 masks but 1 labels"):
        build_segmentation(us_frame, [good, good], ["Lesion 1"], SEGMENTER, ReportContext(), MODEL_KEY)
    with pytest.raises(ValueError, match="shape"):
        build_segmentation(us_frame, [good[:-1]], ["Lesion 1"], SEGMENTER, ReportContext(), MODEL_KEY)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        build_segmentation(us_frame, [good.astype(np.uint8) * 2], ["Lesion 1"], SEGMENTER, ReportContext(), MODEL_KEY)
    with pytest.raises(ValueError, match="blank"):
        build_segmentation(us_frame, [good], [" "], SEGMENTER, ReportContext(), MODEL_KEY)


def test_overlapping_and_empty_masks(us_frame: SourceFrame, tmp_path: pathlib.Path) -> None:
    shape = us_frame.pixels.shape
    masks = [_box(shape, 10, 10, 60, 60), _box(shape, 40, 40, 90, 90), np.zeros(shape, dtype=np.bool_)]
    seg = _build(us_frame, [m.astype(np.uint8) for m in masks])  # 0/1 integers are accepted
    assert seg.SegmentsOverlap == "YES"
    assert seg.NumberOfFrames == 2  # the empty mask's frame is omitted
    back = _round_trip(seg, tmp_path / "seg.dcm")
    stored = _masks_back(back, us_frame)
    for index, mask in enumerate(masks):
        np.testing.assert_array_equal(stored[:, :, index].astype(bool), mask)


@needs_dciodvfy
def test_dciodvfy_accepts_overlapping_segments(us_frame: SourceFrame, tmp_path: pathlib.Path) -> None:
    shape = us_frame.pixels.shape
    seg = _build(us_frame, [_box(shape, 10, 10, 60, 60), _box(shape, 40, 40, 90, 90)])
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []


def test_full_size_mammogram_is_fast() -> None:
    rows, columns = 3000, 2400
    header = make_mg_dataset(np.zeros((rows, columns), dtype=np.uint16), study_uid=STUDY)
    del header.PixelData
    frame = SourceFrame(header, None, np.zeros((rows, columns), dtype=np.uint8), (0, 0, columns, rows), None, None)
    masks = [_box((rows, columns), 300 + 800 * k, 500, 900 + 800 * k, 1300) for k in range(3)]
    _build(frame, masks[:1])  # first use loads highdicom's lazily built tables
    started = time.perf_counter()
    seg = _build(frame, masks)
    elapsed = time.perf_counter() - started
    assert seg.NumberOfFrames == 3 and seg.Rows == rows and seg.Columns == columns
    assert len(seg.PixelData) == 3 * rows * columns // 8  # bit-packed
    assert elapsed < 1.0, f"building took {elapsed:.2f} s"  # about 0.07 s on a laptop-class CPU


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_vendor_header_with_pixel_spacing_and_frame_of_reference(tmp_path: pathlib.Path) -> None:
    """Pixel Spacing, a Frame of Reference without a plane, a separator-style time: still a valid, readable SEG."""
    ds = make_us_dataset(synthetic_breast_image(), study_uid=STUDY)
    ds.PixelSpacing = [0.1, 0.1]
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.41"
    ds.StudyTime = "14:04:38"
    frame = read_frames(write_dataset(ds, tmp_path / "vendor.dcm"))[0]
    _assert_round_trip(frame, _two_masks(frame.pixels.shape), tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    assert back.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.41"
    assert back.StudyTime == "140438"
    assert frame.dataset.StudyTime == "14:04:38"  # the caller's header, which goes on to the report, is untouched
