"""workers.sr_writer: the TID 1500 report, checked by content and by dciodvfy/dsrdump."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from models.inference.findings import FamilyScore, ImageAnalysis, ModelInfo
from tests.dicom_factory import (
    dciodvfy_errors,
    encoded_without_run_stamps,
    make_us_dataset,
    square_lesion_analysis,
    synthetic_breast_image,
    write_dataset,
)
from workers.dicom_reader import SourceFrame, read_frames
from workers.sr_writer import AnalysedFrame, ReportContext, build_report, closed_outline, measurement_groups

STUDY = "1.2.826.0.1.3680043.8.498.1"
SR_SERIES = "1.2.826.0.1.3680043.8.498.2"
SR_SOP = "1.2.826.0.1.3680043.8.498.3"


@pytest.fixture()
def study(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Three instances of one study: single-frame, multi-frame, and one never analysed."""
    single = make_us_dataset(synthetic_breast_image(), study_uid=STUDY, spacing_mm=0.1)
    single.ImageLaterality = "R"
    multi = make_us_dataset(
        np.stack([synthetic_breast_image(seed=s) for s in range(3)]), study_uid=STUDY, spacing_mm=None
    )
    other = make_us_dataset(synthetic_breast_image(seed=7), study_uid=STUDY)
    return {
        "single": write_dataset(single, tmp_path / "single.dcm"),
        "multi": write_dataset(multi, tmp_path / "multi.dcm"),
        "other": write_dataset(other, tmp_path / "other.dcm"),
    }


def _evidence(study: dict[str, pathlib.Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in study.values()]


def _with_region(frame: SourceFrame, xywh: tuple[int, int, int, int]) -> SourceFrame:
    return dataclasses.replace(frame, scan_region_xywh=xywh)


def _report(
    study: dict[str, pathlib.Path], *, lesions: bool = True
) -> tuple[hd.sr.Comprehensive3DSR, list[AnalysedFrame]]:
    single = _with_region(read_frames(study["single"])[0], (20, 10, 280, 220))
    multi = read_frames(study["multi"])[0]
    with_lesion = square_lesion_analysis((220, 280), size=30, probability=0.87)
    if not lesions:
        with_lesion = ImageAnalysis((), with_lesion.segmenter, with_lesion.classifier, (220, 280))
    empty = ImageAnalysis((), with_lesion.segmenter, with_lesion.classifier, multi.pixels.shape)
    analysed = [AnalysedFrame(single, with_lesion), AnalysedFrame(multi, empty)]
    sr = build_report(analysed, _evidence(study), SR_SERIES, SR_SOP, ReportContext())
    return sr, analysed


def _groups(sr: hd.sr.Comprehensive3DSR) -> list[pydicom.Dataset]:
    [imaging] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(imaging.ContentSequence)


def _items(group: pydicom.Dataset, code_value: str) -> list[pydicom.Dataset]:
    return [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def test_header_patient_study_and_evidence(study: dict[str, pathlib.Path]) -> None:
    sr, _ = _report(study)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID) == (STUDY, SR_SERIES, SR_SOP)
    assert str(sr.PatientName) == "ANON^TEST" and sr.PatientID == "TEST0001"
    assert sr.SeriesDescription == "BreastAI report (advisory)"
    assert sr.SeriesNumber == 9901 and sr.InstanceNumber == 1
    assert (sr.PreliminaryFlag, sr.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    listed = {
        ref.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    # Every instance of the study, including the one that was never analysed.
    assert listed == {str(ds.SOPInstanceUID) for ds in _evidence(study)}
    assert "PertinentOtherEvidenceSequence" not in sr


def test_lesion_group_content(study: dict[str, pathlib.Path]) -> None:
    sr, analysed = _report(study)
    lesion_group, empty_group = _groups(sr)
    assert lesion_group.ContentTemplateSequence[0].TemplateIdentifier == "1410"
    [tracking] = _items(lesion_group, "112039")
    assert tracking.TextValue == "Lesion 1"
    [finding] = _items(lesion_group, "121071")
    assert finding.ConceptCodeSequence[0].CodeValue == "4147007"
    [site] = _items(lesion_group, "363698007")
    assert site.ConceptCodeSequence[0].CodeValue == "76752008"
    assert site.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "24028007"  # right
    [probability] = _items(lesion_group, "111047")
    value = probability.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(0.87)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    names = [i.TextValue for i in probability.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111001"]
    assert names == ["breastai-cls-resnet"]
    [long_axis] = _items(lesion_group, "103339001")
    # 30 px square at 0.1 mm: the diagonal, 4.24 mm.
    assert float(long_axis.MeasuredValueSequence[0].NumericValue) == pytest.approx(30 * np.sqrt(2) * 0.1, abs=0.01)
    [region] = _items(lesion_group, "111030")
    assert region.GraphicType == "POLYLINE"
    points = np.array(region.GraphicData, dtype=float).reshape(-1, 2)
    outline = analysed[0].analysis.lesions[0].outline_xy
    np.testing.assert_allclose(points, outline + [20, 10] + 0.5)  # crop offset + half a pixel (PS3.3 C.18.6.1.2)
    np.testing.assert_array_equal(points[0], points[-1])
    assert (
        region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == analysed[0].frame.sop_instance_uid
    )
    assert "ReferencedFrameNumber" not in region.ContentSequence[0].ReferencedSOPSequence[0]
    assert empty_group.ContentTemplateSequence[0].TemplateIdentifier == "1501"


def test_no_lesion_is_stated_explicitly(study: dict[str, pathlib.Path]) -> None:
    sr, analysed = _report(study, lesions=False)
    groups = _groups(sr)
    assert len(groups) == 2
    for group, item in zip(groups, analysed, strict=True):
        [tracking] = _items(group, "112039")
        assert tracking.TextValue == "No lesion detected"
        [presence] = _items(group, "121052")
        assert presence.ConceptCodeSequence[0].CodeValue == "272519000"
        assert not _items(group, "111047")
        [source] = _items(group, "121112")
        ref = source.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == item.frame.sop_instance_uid
    # The multi-frame source is referenced with the analysed frame (middle of 3).
    assert _items(groups[1], "121112")[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 2


def test_no_size_without_spacing(study: dict[str, pathlib.Path]) -> None:
    multi = read_frames(study["multi"])[0]
    assert multi.row_spacing_mm is None
    analysis = square_lesion_analysis(multi.pixels.shape, size=20)
    sr = build_report([AnalysedFrame(multi, analysis)], _evidence(study), SR_SERIES, SR_SOP, ReportContext())
    [group] = _groups(sr)
    assert _items(group, "111047") and not _items(group, "103339001")
    [region] = _items(group, "111030")
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 2


def test_disclaimer_and_models_are_in_the_text(study: dict[str, pathlib.Path]) -> None:
    sr, _ = _report(study)
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    text = container.ContentSequence[0].TextValue
    assert "not for diagnostic use" in text
    assert "breastai-seg-unet 1.2.0" in text and "breastai-cls-resnet 3.4.1" in text


def test_tracking_uids_are_deterministic(study: dict[str, pathlib.Path]) -> None:
    first, _ = _report(study)
    second, _ = _report(study)
    uid = lambda sr: _items(_groups(sr)[0], "112040")[0].UID  # noqa: E731
    assert uid(first) == uid(second)


def test_refuses_inconsistent_input(study: dict[str, pathlib.Path]) -> None:
    frame = read_frames(study["single"])[0]
    analysis = square_lesion_analysis(frame.pixels.shape)
    evidence = _evidence(study)
    foreign = make_us_dataset(synthetic_breast_image(), study_uid="1.2.3.999")
    with pytest.raises(ValueError, match="several studies"):
        build_report([AnalysedFrame(frame, analysis)], [*evidence, foreign], SR_SERIES, SR_SOP, ReportContext())
    with pytest.raises(ValueError, match="not in the evidence"):
        build_report([AnalysedFrame(frame, analysis)], evidence[1:], SR_SERIES, SR_SOP, ReportContext())
    with pytest.raises(ValueError):
        build_report([], evidence, SR_SERIES, SR_SOP, ReportContext())
    lesion = dataclasses.replace(analysis.lesions[0], malignancy_probability=1.5)
    with pytest.raises(ValueError, match="probability"):
        build_report(
            [AnalysedFrame(frame, dataclasses.replace(analysis, lesions=(lesion,)))],
            evidence,
            SR_SERIES,
            SR_SOP,
            ReportContext(),
        )


def test_closed_outline() -> None:
    open_square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], dtype=np.float32)
    closed = closed_outline(open_square, (10, 20))
    assert closed.shape == (5, 2)
    np.testing.assert_array_equal(closed[0], closed[-1])
    np.testing.assert_array_equal(closed[0], [10.5, 20.5])  # pixel centre: SCOORD origin is the pixel corner
    with pytest.raises(ValueError):
        closed_outline(np.array([[0, 0], [1, 1], [0, 0]], dtype=np.float32), (0, 0))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")
@pytest.mark.parametrize("lesions", [True, False])
def test_dciodvfy_reports_no_error(study: dict[str, pathlib.Path], tmp_path: pathlib.Path, lesions: bool) -> None:
    sr, _ = _report(study, lesions=lesions)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk dsrdump not installed")
def test_dsrdump_prints_the_tree(study: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    sr, _ = _report(study)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for expected in (
        "Imaging Measurement Report",
        "Probability of cancer",
        "Long axis",
        "POLYLINE",
        "No lesion detected",
    ):
        assert expected in result.stdout
    assert "error" not in result.stderr.lower()


def test_device_observer_is_recorded(study: dict[str, pathlib.Path]) -> None:
    sr, _ = _report(study)
    observer = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert observer and ReportContext().device_observer_uid == observer[0].UID
    assert codes.DCM.Device.value in {
        i.ConceptCodeSequence[0].CodeValue
        for i in sr.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "121005"
    }


def _family_score(
    family: str, task: str, probability: float, threshold: float, notes: tuple[str, ...] = ()
) -> FamilyScore:

    return FamilyScore(
        family=family,
        task=task,
        model=ModelInfo(f"Model-{family}", "9.9", "ab" * 32),
        probability=probability,
        threshold=threshold,
        positive=probability >= threshold,
        cam=np.ones((30, 30), np.float32),
        roi_box=(0, 0, 30, 30),
        notes=notes,
    )


def test_every_family_has_its_measurement_call_and_algorithm(
    study: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    from models.inference.decisions import co_decision

    single = _with_region(read_frames(study["single"])[0], (20, 10, 280, 220))
    base = square_lesion_analysis((220, 280), size=30, probability=0.87)
    scores = (
        _family_score("dlr_bm", "malignancy", 0.87, 0.5),
        _family_score(
            "dlr_lh", "birads_high", 0.2, 0.6, notes=("patient age not available: scored from the image alone",)
        ),
        _family_score("mupnet", "malignancy", 0.3, 0.4),
    )
    lesion = dataclasses.replace(base.lesions[0], family_scores=scores, co_decision=co_decision(0.2, 0.87, 0.6, 0.5))
    analysis = dataclasses.replace(base, lesions=(lesion,), classifier=scores[0].model)
    sr = build_report([AnalysedFrame(single, analysis)], _evidence(study), SR_SERIES, SR_SOP, ReportContext())
    [group] = _groups(sr)
    probabilities = _items(group, "111047")
    assert [float(i.MeasuredValueSequence[0].NumericValue) for i in probabilities] == [0.87, 0.3]
    assert [float(i.MeasuredValueSequence[0].NumericValue) for i in _items(group, "P-BIRADS45")] == [0.2]
    names = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence if i.ValueType == "CODE"}
    assert names["CALL-DLR_BM"].ConceptCodeSequence[0].CodeValue == "AT-OR-ABOVE-OP"
    assert names["CALL-DLR_LH"].ConceptCodeSequence[0].CodeValue == "BELOW-OP"
    assert names["BIRADS4A-RESTRAT"].ConceptCodeSequence[0].CodeValue == "KEEP-4A"  # LH low, BM malignant: disagree
    algorithm = [
        i.TextValue
        for i in names["CALL-MUPNET"].ContentSequence
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"
    ]
    assert algorithm == ["Model-mupnet"]
    comment = sr.ContentSequence[-1].ContentSequence[0].TextValue
    assert (
        "Model-dlr_lh: patient age not available" in comment
        and "only to lesions a radiologist assessed as 4A" in comment
    )
    assert (
        "it reads Model-dlr_lh 9.9 (BI-RADS 4/5) with Model-dlr_bm 9.9 (malignancy), each at its operating point."
        in comment
    )
    if shutil.which("dciodvfy"):
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


def test_the_4a_comment_names_the_lh_consensus_it_read_and_a_call_without_its_inputs_is_refused(
    study: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    from models.inference.decisions import co_decision

    single = _with_region(read_frames(study["single"])[0], (20, 10, 280, 220))
    base = square_lesion_analysis((220, 280), size=30, probability=0.87)
    scores = (
        _family_score("dlr_bm", "malignancy", 0.87, 0.5),
        _family_score("consensus_lh", "birads_high", 0.7, 0.4),
        _family_score("dlr_lh", "birads_high", 0.2, 0.6),
    )
    lesion = dataclasses.replace(base.lesions[0], family_scores=scores, co_decision=co_decision(0.7, 0.87, 0.4, 0.5))
    analysis = dataclasses.replace(base, lesions=(lesion,), classifier=scores[0].model)
    sr = build_report([AnalysedFrame(single, analysis)], _evidence(study), SR_SERIES, SR_SOP, ReportContext())
    comment = sr.ContentSequence[-1].ContentSequence[0].TextValue
    assert (
        "it reads Model-consensus_lh 9.9 (BI-RADS 4/5) with Model-dlr_bm 9.9 (malignancy)" in comment
        and "Model-dlr_lh 9.9 (BI-RADS" not in comment
    )
    [group] = _groups(sr)
    # "CALL-CONSENSUS_LH" is longer than Code Value's 16 characters: highdicom encodes it as Long Code Value (PS3.3 8.8)
    concept = [i.ConceptNameCodeSequence[0] for i in group.ContentSequence if i.ValueType == "CODE"]
    assert any(c.get("LongCodeValue") == "CALL-CONSENSUS_LH" and "CodeValue" not in c for c in concept)
    names = {
        c.get("CodeValue") or c.get("LongCodeValue"): i
        for c, i in zip(concept, (i for i in group.ContentSequence if i.ValueType == "CODE"), strict=True)
    }
    # the consensus's high LH, BM malignant
    assert names["BIRADS4A-RESTRAT"].ConceptCodeSequence[0].CodeValue == "UPGRADE"
    if shutil.which("dciodvfy"):
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
    orphan = dataclasses.replace(lesion, family_scores=scores[1:])  # no DLR_BM score behind the call
    with pytest.raises(ValueError, match="without the LH and BM scores"):
        build_report(
            [AnalysedFrame(single, dataclasses.replace(analysis, lesions=(orphan,)))],
            _evidence(study),
            SR_SERIES,
            SR_SOP,
            ReportContext(),
        )


def test_the_patient_study_header_repairs_a_copy_and_leaves_the_source_alone() -> None:
    from workers.sr_writer import patient_study_header

    source = pydicom.Dataset()
    source.StudyInstanceUID = "1.2.3"
    source.StudyTime = "14:04:38"
    source.PatientSex = "X"
    header = patient_study_header(source)
    assert (header.StudyTime, header.PatientSex) == ("140438", "")
    assert (source.StudyTime, source.PatientSex) == ("14:04:38", "X")


def test_the_report_is_the_document_highdicom_builds_from_the_whole_tree(study: dict[str, pathlib.Path]) -> None:
    """build_report gives highdicom the root alone and attaches the tree itself: the same document, the same tree."""
    from workers.sr_writer import SERIES_DESCRIPTION, patient_study_header

    sr, _ = _report(study)
    evidence = _evidence(study)
    context = ReportContext()
    whole = hd.sr.Comprehensive3DSR(
        evidence=[patient_study_header(evidence[0]), *evidence[1:]],
        content=sr.content[0],
        series_instance_uid=SR_SERIES,
        series_number=9901,
        sop_instance_uid=SR_SOP,
        instance_number=1,
        manufacturer=context.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=context.institution_name,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=context.manufacturer_model_name,
        software_versions=context.software_versions,
    )
    whole.PatientAge = sr.PatientAge  # what build_report copies after the constructor (Type 3)
    assert encoded_without_run_stamps(sr) == encoded_without_run_stamps(whole)
    # The object's own tree (highdicom's ``content``) is the document's, not just its root.
    assert list(sr.content[0].ContentSequence) == list(sr.ContentSequence)
    assert len(sr.content[0].ContentSequence) == len(whole.content[0].ContentSequence) > 3


def test_a_referenced_image_missing_from_the_evidence_is_refused(study: dict[str, pathlib.Path]) -> None:
    """The check highdicom's constructor makes on the tree it is given, made on the tree attached after it."""
    from workers.sr_writer import _referenced_instances, attach_content

    sr, analysed = _report(study)
    analysed_uids = {item.frame.sop_instance_uid for item in analysed}
    assert _referenced_instances(sr.ContentSequence) == analysed_uids
    without_single = [ds for ds in _evidence(study) if ds.SOPInstanceUID != analysed[0].frame.sop_instance_uid]
    with pytest.raises(ValueError, match=analysed[0].frame.sop_instance_uid):
        attach_content(sr, sr.content[0], without_single)


def test_measurement_groups_built_beforehand_give_the_report_built_at_once(study: dict[str, pathlib.Path]) -> None:
    """The worker builds each frame's groups on its own thread; the report is the one built in one go."""
    sr, analysed = _report(study)
    beforehand = [measurement_groups(item) for item in analysed]
    again = build_report(analysed, _evidence(study), SR_SERIES, SR_SOP, ReportContext(), frame_groups=beforehand)
    assert encoded_without_run_stamps(again) == encoded_without_run_stamps(sr)
    tracked = [_items(group, "112040")[0].UID for group in _groups(again)]
    assert len(set(tracked)) == len(tracked) == 2 and "2.25.0" not in tracked


def test_measurement_groups_serve_one_report_and_must_match_its_frames(study: dict[str, pathlib.Path]) -> None:
    _, analysed = _report(study)
    groups = [measurement_groups(item) for item in analysed]
    build_report(analysed, _evidence(study), SR_SERIES, SR_SOP, ReportContext(), frame_groups=groups)
    with pytest.raises(ValueError, match="built for another report"):
        build_report(analysed, _evidence(study), SR_SERIES, "2.25.99", ReportContext(), frame_groups=groups)
    fresh = [measurement_groups(item) for item in analysed]
    with pytest.raises(ValueError, match="frames' measurement groups"):
        build_report(analysed, _evidence(study), SR_SERIES, SR_SOP, ReportContext(), frame_groups=fresh[:1])
    with pytest.raises(ValueError, match="0 measurement groups for 1 findings"):
        build_report(analysed, _evidence(study), SR_SERIES, SR_SOP, ReportContext(), frame_groups=[fresh[0], ()])
