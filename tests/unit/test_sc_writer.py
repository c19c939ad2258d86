"""workers.sc_writer: the Secondary Capture overlay."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pydicom
import pytest

from models.inference.findings import ImageAnalysis
from tests.dicom_factory import (
    dciodvfy_errors,
    make_us_dataset,
    square_lesion_analysis,
    synthetic_breast_image,
    write_dataset,
)
from workers.dicom_reader import SourceFrame, read_frames
from workers.sc_writer import build_overlay_image
from workers.sr_writer import ReportContext

SERIES = "1.2.826.0.1.3680043.8.498.20"
SOP = "1.2.826.0.1.3680043.8.498.21"


@pytest.fixture()
def frame(tmp_path: pathlib.Path) -> SourceFrame:
    ds = make_us_dataset(synthetic_breast_image(), study_uid="1.2.826.0.1.3680043.8.498.10")
    return read_frames(write_dataset(ds, tmp_path / "src.dcm"))[0]


@pytest.fixture()
def multi_frame(tmp_path: pathlib.Path) -> SourceFrame:
    stack = np.stack([synthetic_breast_image(seed=s) for s in range(4)])
    return read_frames(write_dataset(make_us_dataset(stack), tmp_path / "multi.dcm"))[0]


def test_overlay_header(frame: SourceFrame) -> None:
    analysis = square_lesion_analysis(frame.pixels.shape)
    sc = build_overlay_image(frame, analysis, SERIES, SOP, 3, ReportContext(institution_name="Test Hospital"))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID, sc.InstanceNumber, sc.SeriesNumber) == (SERIES, SOP, 3, 9902)
    assert sc.StudyInstanceUID == frame.study_instance_uid
    assert (str(sc.PatientName), sc.PatientID) == ("ANON^TEST", "TEST0001")
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert (sc.Rows, sc.Columns) == frame.pixels.shape
    assert sc.BurnedInAnnotation == "YES"
    assert sc.Modality == "OT"
    assert sc.InstitutionName == "Test Hospital"
    for text in (sc.ImageComments, sc.DerivationDescription):
        assert "not for diagnostic use" in text
        assert "breastai-seg-unet 1.2.0" in text and "breastai-cls-resnet 3.4.1" in text
    assert "p=0.87" in sc.ImageComments
    [source] = sc.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == frame.sop_instance_uid
    assert source.ReferencedSOPClassUID == frame.sop_class_uid
    assert "ReferencedFrameNumber" not in source


def test_pixels_are_the_rendered_overlay(frame: SourceFrame) -> None:
    analysis = square_lesion_analysis(frame.pixels.shape, size=40)
    sc = build_overlay_image(frame, analysis, SERIES, SOP, 1, ReportContext())
    pixels = sc.pixel_array
    assert pixels.shape == (*frame.pixels.shape, 3) and pixels.dtype == np.uint8
    x0, y0, w, h = analysis.lesions[0].bbox_xywh
    centre = pixels[y0 + h // 2, x0 + w // 2].astype(int)
    assert centre.max() - centre.min() > 20  # heat map colour over the lesion


def test_multi_frame_source_is_referenced_with_its_frame(multi_frame: SourceFrame) -> None:
    base = square_lesion_analysis(multi_frame.pixels.shape)
    empty = ImageAnalysis((), base.segmenter, base.classifier, multi_frame.pixels.shape)
    sc = build_overlay_image(multi_frame, empty, SERIES, SOP, 1, ReportContext())
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 3
    assert "No lesion detected" in sc.ImageComments


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")
def test_dciodvfy_reports_no_error(frame: SourceFrame, multi_frame: SourceFrame, tmp_path: pathlib.Path) -> None:
    for index, source in enumerate((frame, multi_frame), start=1):
        analysis = square_lesion_analysis(source.scan_region_pixels.shape)
        sc = build_overlay_image(source, analysis, SERIES, f"{SOP}.{index}", index, ReportContext())
        path = tmp_path / f"sc{index}.dcm"
        sc.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        reread = pydicom.dcmread(path)
        assert reread.BurnedInAnnotation == "YES"


def test_overlays_sharing_one_repaired_header_are_those_built_alone(frame: SourceFrame) -> None:
    """The consumer repairs a frame's header once for all of its family overlays: same objects, header untouched."""
    import copy
    import io

    from workers.sr_writer import patient_study_header

    def blank(item: pydicom.Dataset) -> None:
        for element in item:
            if element.VR in ("DA", "TM", "DT"):
                element.value = ""  # creation stamps
            elif element.VR == "SQ":
                for child in element.value:
                    blank(child)

    def encoded(ds: pydicom.Dataset) -> bytes:
        ds = copy.deepcopy(ds)
        blank(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    frame.dataset.StudyDescription = "BREAST US"
    analysis = square_lesion_analysis(frame.pixels.shape)
    header = patient_study_header(frame.dataset)
    before = copy.deepcopy(header)
    shared = [
        build_overlay_image(frame, analysis, SERIES, f"{SOP}.{n}", n, ReportContext(), header=header) for n in (1, 2)
    ]
    alone = [build_overlay_image(frame, analysis, SERIES, f"{SOP}.{n}", n, ReportContext()) for n in (1, 2)]
    assert [encoded(sc) for sc in shared] == [encoded(sc) for sc in alone]
    assert shared[0].StudyDescription == "BREAST US"
    assert shared[0]["StudyDescription"] is not shared[1]["StudyDescription"]  # one element per data set
    assert header == before
