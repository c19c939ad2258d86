"""The Mammography CAD SR (workers.mammo_cad_sr): TID 4000 tree over real MG files, dciodvfy-clean (issue 36)."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from models.inference.findings import ImageAnalysis, Lesion, ModelInfo
from tests.dicom_factory import dciodvfy_errors, make_mg_dataset, write_dataset
from workers.dicom_reader import read_frames
from workers.mammo_cad_sr import _time, _view, build_mammography_cad_report
from workers.sr_writer import AnalysedFrame, ReportContext

STUDY = "1.2.826.0.1.3680043.8.498.41"
FINDER = ModelInfo("breastai-mg-finder", "0.3.0", "b" * 64)
DLM = ModelInfo("breastai-dlm", "1.1.0", "c" * 64)
MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")


def _lesion(x: int, y: int, size: int, detection: float, malignancy: float) -> Lesion:
    outline = np.array([[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]], dtype=np.float32)
    return Lesion(
        outline_xy=outline,
        bbox_xywh=(x, y, size + 1, size + 1),
        area_px=(size + 1) ** 2,
        malignancy_probability=malignancy,
        cam=np.zeros((1, 1), np.float32),
        detection_probability=detection,
    )


def _study(tmp_path: pathlib.Path, lesions: dict[str, tuple[Lesion, ...]]) -> list[AnalysedFrame]:
    """A two-view (L and R CC) MG study on disk, read back as the worker reads it, with the given findings."""
    analysed = []
    for number, (side, found) in enumerate(lesions.items(), start=1):
        pixels = np.random.default_rng(number).integers(0, 4096, size=(320, 256), dtype=np.uint16)
        ds = make_mg_dataset(pixels, study_uid=STUDY, laterality=side, view="CC")
        (frame,) = read_frames(write_dataset(ds, tmp_path / f"{side}.dcm"))
        whole = dataclasses.replace(frame, scan_region_xywh=(0, 0, 256, 320))
        analysis = ImageAnalysis(lesions=found, segmenter=FINDER, classifier=DLM, image_shape=(320, 256), modality="MG")
        analysed.append(AnalysedFrame(frame=whole, analysis=analysis))
    return analysed


def _children(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(item.get("ContentSequence") or [])


def _named(items: list[pydicom.Dataset], meaning: str) -> list[pydicom.Dataset]:
    return [i for i in items if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _walk(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    found = [item]
    for child in _children(item):
        found.extend(_walk(child))
    return found


def _save(sr: pydicom.Dataset, path: pathlib.Path) -> pydicom.Dataset:
    sr.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _build(analysed: list[AnalysedFrame]) -> pydicom.Dataset:
    return build_mammography_cad_report(
        analysed, [a.frame.dataset for a in analysed], "2.25.1001", "2.25.1002", ReportContext()
    )


def test_two_view_study_with_findings_has_the_tid_4000_tree(tmp_path: pathlib.Path) -> None:
    analysed = _study(
        tmp_path,
        {
            "L": (_lesion(40, 60, 30, 0.83, 0.61), _lesion(150, 200, 20, 0.42, 0.12)),
            "R": (_lesion(90, 90, 25, 0.7, 0.9),),
        },
    )
    sr = _save(_build(analysed), tmp_path / "cad.dcm")

    assert sr.SOPClassUID == MAMMOGRAPHY_CAD_SR and sr.Modality == "SR"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "111036"  # Mammography CAD Report
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == ("PRELIMINARY", "UNVERIFIED", "COMPLETE")
    top = _children(sr)
    assert [i.ConceptNameCodeSequence[0].CodeValue for i in top] == ["121049", "111028", "111017", "111064", "111065"]

    (library,) = _named(top, "Image Library")
    entries = _children(library)
    assert [str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for e in entries] == [
        a.frame.sop_instance_uid for a in analysed
    ]
    sides = [_named(_children(e), "Image Laterality")[0].ConceptCodeSequence[0].CodeMeaning for e in entries]
    assert sides == ["Left breast", "Right breast"]
    assert all(_named(_children(e), "Image View")[0].ConceptCodeSequence[0].CodeValue == "399162004" for e in entries)

    (summary,) = _named(top, "CAD Processing and Findings Summary")
    assert summary.ConceptCodeSequence[0].CodeValue == "111242"  # all algorithms succeeded; with findings
    impressions = _children(summary)
    lesions = [(i, lesion) for i, a in enumerate(analysed, start=1) for lesion in a.analysis.lesions]
    assert len(impressions) == len(lesions) == 3
    for impression, (index, lesion) in zip(impressions, lesions, strict=True):
        assert impression.ConceptNameCodeSequence[0].CodeMeaning.startswith("Individual Impression")
        (finding,) = _named(_children(impression), "Single Image Finding")
        props = _children(finding)
        assert _named(props, "Rendering Intent")[0].ConceptCodeSequence[0].CodeValue == "111151"  # optional
        (certainty,) = _named(props, "Certainty of Finding")
        assert float(certainty.MeasuredValueSequence[0].NumericValue) == pytest.approx(
            100 * lesion.detection_probability
        )
        assert certainty.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
        (cancer,) = _named(props, "Probability of cancer")
        assert float(cancer.MeasuredValueSequence[0].NumericValue) == pytest.approx(100 * lesion.malignancy_probability)
        assert [t.TextValue for t in _named(_children(cancer), "Algorithm Name")] == [DLM.name]
        assert [t.TextValue for t in _named(props, "Algorithm Name")] == [FINDER.name]
        assert [t.TextValue for t in _named(props, "Algorithm Version")] == [FINDER.version]
        (centre,) = _named(props, "Center")
        x, y = (float(v) for v in centre.GraphicData)
        entry = pydicom.dcmread(tmp_path / ("L.dcm" if index == 1 else "R.dcm"), stop_before_pixels=True)
        assert 0 <= x <= entry.Columns and 0 <= y <= entry.Rows
        bx, by, bw, bh = lesion.bbox_xywh
        assert bx <= x <= bx + bw and by <= y <= by + bh
        (outline,) = _named(props, "Outline")
        assert outline.GraphicType == "POLYLINE" and list(outline.GraphicData[:2]) == list(outline.GraphicData[-2:])
        for scoord in (centre, outline):
            (ref,) = _children(scoord)
            assert ref.RelationshipType == "SELECTED FROM"
            assert list(ref.ReferencedContentItemIdentifier) == [1, 2, index]

    (detections,) = _named(top, "Summary of Detections")
    assert detections.ConceptCodeSequence[0].CodeMeaning == "Succeeded"
    (performed,) = _children(_children(detections)[0])
    assert [t.TextValue for t in _named(_children(performed), "Algorithm Name")] == [FINDER.name]
    assert [t.TextValue for t in _named(_children(performed), "Algorithm Version")] == [FINDER.version]
    (analyses,) = _named(top, "Summary of Analyses")
    assert analyses.ConceptCodeSequence[0].CodeMeaning == "Succeeded"


def test_study_without_findings_says_so_and_lists_no_analysis(tmp_path: pathlib.Path) -> None:
    analysed = _study(tmp_path, {"L": (), "R": ()})
    sr = _save(_build(analysed), tmp_path / "cad.dcm")
    top = _children(sr)
    (summary,) = _named(top, "CAD Processing and Findings Summary")
    assert summary.ConceptCodeSequence[0].CodeValue == "111241" and not _children(summary)
    assert not [
        i
        for i in _walk(sr)
        if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeMeaning == "Single Image Finding"
    ]
    assert _named(top, "Summary of Detections")[0].ConceptCodeSequence[0].CodeMeaning == "Succeeded"
    # DL-M scores regions only: with none, no analysis ran.
    assert _named(top, "Summary of Analyses")[0].ConceptCodeSequence[0].CodeMeaning == "Not Attempted"
    assert len(_children(_named(top, "Image Library")[0])) == 2


def test_same_inputs_give_the_same_document_and_bad_inputs_are_refused(tmp_path: pathlib.Path) -> None:
    analysed = _study(tmp_path, {"L": (_lesion(40, 60, 30, 0.83, 0.61),)})
    first, second = _build(analysed), _build(analysed)
    assert first.ContentSequence == second.ContentSequence
    with pytest.raises(ValueError, match="at least one"):
        build_mammography_cad_report([], [analysed[0].frame.dataset], "2.25.1", "2.25.2", ReportContext())
    us = dataclasses.replace(analysed[0], analysis=dataclasses.replace(analysed[0].analysis, modality="US"))
    with pytest.raises(ValueError, match="not a mammogram"):
        _build([us])
    bad = dataclasses.replace(
        analysed[0],
        analysis=dataclasses.replace(analysed[0].analysis, lesions=(_lesion(40, 60, 30, 1.5, 0.61),)),
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _build([bad])


@needs_dciodvfy
@pytest.mark.parametrize("with_findings", [True, False])
def test_dciodvfy_finds_no_error(tmp_path: pathlib.Path, with_findings: bool) -> None:
    found = {"L": (_lesion(40, 60, 30, 0.83, 0.61),), "R": (_lesion(90, 90, 25, 0.7, 0.9),)}
    analysed = _study(tmp_path, found if with_findings else {"L": (), "R": ()})
    path = tmp_path / "cad.dcm"
    _build(analysed).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == [], subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr


def test_cad_report_is_delivered_after_overlays_and_segmentations_and_before_the_main_report() -> None:
    from workers.consumer import StudyResults

    named = {name: pydicom.Dataset() for name in ("overlay", "seg", "cad", "report")}
    for name, ds in named.items():
        ds.SeriesDescription = name
    results = StudyResults(
        report=named["report"],
        overlays=(named["overlay"],),
        skipped=(),
        segmentations=(named["seg"],),
        cad_report=named["cad"],
    )
    assert [ds.SeriesDescription for ds in results.datasets] == ["overlay", "seg", "cad", "report"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1404", datetime.time(14, 4)),
        ("0930", datetime.time(9, 30)),
        ("14", datetime.time(14)),
        ("093015.5", datetime.time(9, 30, 15, 500000)),
        ("", None),
        ("2561", None),
    ],
)
def test_times_of_every_tm_form_are_read_as_written(value: str, expected: datetime.time | None) -> None:
    assert _time(value) == expected


def test_a_view_code_without_its_meaning_gets_the_meaning_of_the_same_code() -> None:
    ds = make_mg_dataset(np.zeros((64, 48), np.uint16), laterality="L", view="CC")
    ds.ViewCodeSequence[0].CodeMeaning = ""
    view = _view(ds)
    assert view is not None and view.value == "399162004" and view.meaning
