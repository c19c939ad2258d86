"""The mammography findings as a DICOM Mammography CAD SR (PS3.3 A.35.5, PS3.16 TID 4000).

Several mammography consumers (review workstations, CAD viewers) read a
Mammography CAD SR rather than a TID 1500 Measurement Report. This is a
second view of the same findings, sent beside the main report
(workers.sr_writer), which stays the one the service is judged by. Content
tree (PS3.16)::

    CONTAINER (111036, DCM, "Mammography CAD Report")            TID 4000
      HAS CONCEPT MOD  Language of Content Item and Descendants   TID 1204
      CONTAINS CONTAINER (111028, DCM, "Image Library")
        CONTAINS IMAGE (no concept name), per analysed mammogram   TID 4020
          HAS ACQ CONTEXT Image Laterality, Image View, Patient Orientation Row/Column,
                          Study Date/Time, Content Date/Time, Horizontal/Vertical Pixel Spacing
      CONTAINS CODE (111017, DCM, "CAD Processing and Findings Summary")   TID 4001, CID 6047
        INFERRED FROM CONTAINER (111034, DCM, "Individual Impression/Recommendation"), per finding   TID 4003
          HAS CONCEPT MOD Rendering Intent = Presentation Optional              CID 6034
          CONTAINS CODE (111059, DCM, "Single Image Finding") = Selected region   TID 4006, CID 6014
            HAS CONCEPT MOD Rendering Intent = Presentation Optional
            HAS CONCEPT MOD Algorithm Name / Version / Parameters (finder)      TID 4019
            HAS PROPERTIES NUM Certainty of Finding (detection probability, %)
            HAS PROPERTIES NUM Probability of cancer (DL-M, %)
              HAS CONCEPT MOD Algorithm Name / Version / Parameters (DL-M)      TID 4019
            HAS PROPERTIES SCOORD Center (POINT)     R-SELECTED FROM the Image Library entry
            HAS PROPERTIES SCOORD Outline (POLYLINE) R-SELECTED FROM the Image Library entry
      CONTAINS CODE (111064, DCM, "Summary of Detections") = Succeeded            CID 6042
        INFERRED FROM CONTAINER (111063, DCM, "Successful Detections")          TID 4015
          CONTAINS CODE (111022, DCM, "Detection Performed") = Selected region    TID 4017
            HAS CONCEPT MOD finder's TID 4019; R-INFERRED FROM each analysed image
      CONTAINS CODE (111065, DCM, "Summary of Analyses") = Succeeded, or Not Attempted
                    when no region was found (DL-M scores regions only)
        INFERRED FROM CONTAINER (111062, DCM, "Successful Analyses")            TID 4016
          CONTAINS CODE (111004, DCM, "Analysis Performed")
                        = Individual Impression/Recommendation Analysis           TID 4018, CID 6043
            HAS CONCEPT MOD DL-M's TID 4019; R-INFERRED FROM each image with a finding

Code choices: the finder proposes regions of any kind (mass, architectural
distortion, asymmetry) without deciding which, and CID 6014 "Mammography
Single Image Finding" has no generic abnormality concept; (111099, DCM,
"Selected region") is its only member that does not claim a type the model
did not decide (a CAD reader that marks only masses will then not mark
these). Every finding is "Presentation Optional" (CID 6034): the results are
advisory, not for diagnostic use. Image references inside the findings and
the algorithm summaries are by reference to the Image Library entries
(PS3.16 TID 4017 and TID 4021: "shall reference IMAGE content items in the
Image Library"), as PS3.3 A.35.5.3.1.2 allows for this IOD.

highdicom (0.28) has classes for Enhanced, Comprehensive and Comprehensive
3D SR but none for the Mammography CAD SR; its SR document base class
(``highdicom.sr.sop._SR``, private) takes the SOP Class UID and writes the
SR Document Series, SR Document General and SOP Common modules, so it is
used with this IOD's SOP Class, as its public subclasses do with theirs.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr.sop import _SR
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import MammographyCADSRStorage
from pydicom.valuerep import TM

from models.inference.findings import Lesion, ModelInfo
from workers.sr_writer import (
    CONTENT_SEQUENCE,
    AnalysedFrame,
    ReportContext,
    algorithm_identification,
    attach_content,
    closed_outline,
    image_laterality,
    patient_study_header,
    unique_by_uid,
    without_children,
)

SERIES_DESCRIPTION = "BreastAI mammography CAD (advisory)"
# After the report (9901), the overlay series (9902 + one per family) and before the SEG series (9950).
SERIES_NUMBER = 9940

MAMMOGRAPHY_CAD_REPORT = codes.DCM.MammographyCADReport  # (111036, DCM)
SELECTED_REGION = codes.DCM.SelectedRegion  # (111099, DCM), CID 6014: see the module docstring
PRESENTATION_OPTIONAL = codes.DCM.PresentationOptionalRenderingDeviceMayPresent  # (111151, DCM), CID 6034
# pydicom's meaning has a zero-width space after the slash (from the standard's HTML), which Latin-1 cannot hold.
INDIVIDUAL_IMPRESSION = Code("111034", "DCM", "Individual Impression/Recommendation")
INDIVIDUAL_IMPRESSION_ANALYSIS = Code("111233", "DCM", "Individual Impression/Recommendation Analysis")  # CID 6043
UNIT_PERCENT = Code("%", "UCUM", "Percent")
SIDES = {  # CID 6022 "Side"
    "L": codes.SCT.LeftBreast,
    "R": codes.SCT.RightBreast,
    "B": codes.SCT.BothBreasts,
}
VIEWS = {  # View Position (PS3.3 C.8.11.5) to CID 4014 "View for Mammography"
    "CC": codes.SCT.CranioCaudal,
    "MLO": codes.SCT.MedioLateralObliqueProjection,
    "ML": codes.SCT.MedioLateralProjection,
    "LM": codes.SCT.LateroMedial,
    "LMO": codes.SCT.LateroMedialOblique,
    "FB": codes.SCT.CaudoCranial,
    "SIO": codes.SCT.SuperolateralToInferomedialOblique,
    "XCCL": codes.SCT.CranioCaudalExaggeratedLaterally,
    "XCCM": codes.SCT.CranioCaudalExaggeratedMedially,
}
ISO_ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_CONCEPT_MOD = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
_PROPERTIES = hd.sr.RelationshipTypeValues.HAS_PROPERTIES
_ACQ_CONTEXT = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_INFERRED_FROM = hd.sr.RelationshipTypeValues.INFERRED_FROM
# Positions of the Image Library's entries in the tree (PS3.3 C.17.3.2.5): the root is 1, the library its 2nd child.
_LIBRARY_PATH = (1, 2)


class MammographyCADSR(_SR):
    """A Mammography CAD SR document (PS3.3 A.35.5), on highdicom's SR document base class.

    Its content tree is attached after construction (:func:`workers.sr_writer.attach_content`), by-reference
    items kept as built (see :func:`build_mammography_cad_report`).
    """

    def __init__(
        self,
        evidence: Sequence[pydicom.Dataset],
        content: pydicom.Dataset,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        context: ReportContext,
    ) -> None:
        super().__init__(
            evidence=evidence,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=MammographyCADSRStorage,
            instance_number=instance_number,
            series_description=SERIES_DESCRIPTION,
            **context.sr_document_arguments(),
        )


def build_mammography_cad_report(
    analysed_mg_frames: Sequence[AnalysedFrame],
    evidence: Sequence[pydicom.Dataset],
    series_uid: str,
    sop_uid: str,
    context: ReportContext,
    instance_number: int = 1,
) -> MammographyCADSR:
    """Build the Mammography CAD SR of a study's analysed mammograms.

    Parameters
    ----------
    analysed_mg_frames
        The study's analysed mammograms (``analysis.modality == "MG"``), at least one, each analysed once.
    evidence
        Headers of every instance of the study; listed in the Current Requested Procedure Evidence Sequence (PS3.3
        C.17.2) and the source of the patient and study attributes (repaired as the main report's are).
    series_uid, sop_uid
        UIDs of the document, derived by the caller so that a redelivered job produces the same document.
    context
        Equipment identity (General Equipment module).
    instance_number
        Instance Number of the document.

    Returns
    -------
    MammographyCADSR
        PRELIMINARY, UNVERIFIED, COMPLETE document in Explicit VR Little Endian.

    Raises
    ------
    ValueError
        No mammogram, one that is not MG or is listed twice, no evidence, an analysed image missing from the
        evidence, a probability outside [0, 1], or a lesion outline that is not a polygon.
    """
    if not analysed_mg_frames:
        raise ValueError("build_mammography_cad_report needs at least one analysed mammogram")
    if not evidence:
        raise ValueError("build_mammography_cad_report needs the study's instances as evidence")
    uids = [item.frame.sop_instance_uid for item in analysed_mg_frames]
    if len(set(uids)) != len(uids):
        raise ValueError("a mammogram is listed more than once")
    evidence_uids = {str(ds.SOPInstanceUID) for ds in evidence}
    for item in analysed_mg_frames:
        if item.analysis.modality != "MG":
            raise ValueError(f"instance {item.frame.sop_instance_uid} is {item.analysis.modality}, not a mammogram")
        if item.frame.sop_instance_uid not in evidence_uids:
            raise ValueError(f"analysed instance {item.frame.sop_instance_uid} is not in the evidence")

    findings = [
        (index, item, lesion)
        for index, item in enumerate(analysed_mg_frames, start=1)
        for lesion in item.analysis.lesions
    ]
    root = hd.sr.ContainerContentItem(name=MAMMOGRAPHY_CAD_REPORT, template_id="4000")
    tree: list[pydicom.Dataset] = [
        *hd.sr.LanguageOfContentItemAndDescendants(ISO_ENGLISH),
        _image_library(analysed_mg_frames),
        _findings_summary(findings),
        _summary(
            codes.DCM.SummaryOfDetections,
            codes.DCM.SuccessfulDetections,
            codes.DCM.DetectionPerformed,
            SELECTED_REGION,
            _models(item.analysis.segmenter for item in analysed_mg_frames),
            range(1, len(analysed_mg_frames) + 1),
        ),
        _summary(
            codes.DCM.SummaryOfAnalyses,
            codes.DCM.SuccessfulAnalyses,
            codes.DCM.AnalysisPerformed,
            INDIVIDUAL_IMPRESSION_ANALYSIS,
            _models(item.analysis.classifier for _, item, _ in findings),
            sorted({index for index, _, _ in findings}),
        ),
    ]

    unique_evidence = unique_by_uid(evidence)
    unique_evidence[0] = patient_study_header(unique_evidence[0])
    # highdicom deep-copies and re-parses the content it is given; its content item parser does not take
    # by-reference items (Referenced Content Item Identifier), so it gets the root alone and the tree is put in
    # place after, as the main report's is (workers.sr_writer.attach_content).
    _set_children(root, tree)
    sr = MammographyCADSR(
        evidence=unique_evidence,
        content=without_children(root),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        context=context,
    )
    attach_content(sr, root, unique_evidence)
    return sr


def _image_library(analysed: Sequence[AnalysedFrame]) -> hd.sr.ContainerContentItem:
    """TID 4000 row 3: the Image Library, one TID 4020 entry per analysed mammogram, in the order given."""
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    _set_children(library, [_library_entry(item) for item in analysed])
    return library


def _library_entry(item: AnalysedFrame) -> hd.sr.ImageContentItem:
    """TID 4020 CAD Image Library Entry: the image and what a CAD consumer places it by."""
    ds = item.frame.dataset
    entry = hd.sr.ImageContentItem(
        name=codes.DCM.ImageLibrary,  # removed below: a TID 4020 IMAGE item has no concept name
        referenced_sop_class_uid=item.frame.sop_class_uid,
        referenced_sop_instance_uid=item.frame.sop_instance_uid,
        relationship_type=_CONTAINS,
    )
    del entry.ConceptNameCodeSequence
    context: list[pydicom.Dataset] = []
    side = image_laterality(ds)
    if side:
        context.append(_code(codes.DCM.ImageLaterality, SIDES[side], _ACQ_CONTEXT))
    view = _view(ds)
    if view is not None:
        context.append(_code(codes.DCM.ImageView, view, _ACQ_CONTEXT))
    orientation = list(ds.get("PatientOrientation") or [])
    if len(orientation) == 2:
        for name, value in zip(
            (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn), orientation, strict=True
        ):
            context.append(hd.sr.TextContentItem(name=name, value=str(value), relationship_type=_ACQ_CONTEXT))
    for date_name, time_name, date_key, time_key in (
        (codes.DCM.StudyDate, codes.DCM.StudyTime, "StudyDate", "StudyTime"),
        (codes.DCM.ContentDate, codes.DCM.ContentTime, "ContentDate", "ContentTime"),
    ):
        date, time = _date(ds.get(date_key)), _time(ds.get(time_key))
        if date is not None:
            context.append(hd.sr.DateContentItem(name=date_name, value=date, relationship_type=_ACQ_CONTEXT))
        if time is not None:
            context.append(hd.sr.TimeContentItem(name=time_name, value=time, relationship_type=_ACQ_CONTEXT))
    if item.frame.column_spacing_mm is not None and item.frame.row_spacing_mm is not None:
        for name, value in (
            (codes.DCM.HorizontalPixelSpacing, item.frame.column_spacing_mm),
            (codes.DCM.VerticalPixelSpacing, item.frame.row_spacing_mm),
        ):
            context.append(
                hd.sr.NumContentItem(
                    name=name, value=float(value), unit=codes.UCUM.Millimeter, relationship_type=_ACQ_CONTEXT
                )
            )
    if context:
        _set_children(entry, context)
    return entry


def _findings_summary(findings: Sequence[tuple[int, AnalysedFrame, Lesion]]) -> hd.sr.CodeContentItem:
    """TID 4001: CAD Processing and Findings Summary (CID 6047), inferred from one TID 4003 per finding."""
    summary = _code(
        codes.DCM.CADProcessingAndFindingsSummary,
        codes.DCM.AllAlgorithmsSucceededWithFindings if findings else codes.DCM.AllAlgorithmsSucceededWithoutFindings,
        _CONTAINS,
    )
    if findings:
        _set_children(summary, [_impression(index, item, lesion) for index, item, lesion in findings])
    return summary


def _impression(index: int, item: AnalysedFrame, lesion: Lesion) -> hd.sr.ContainerContentItem:
    """TID 4003 Individual Impression/Recommendation holding one TID 4006 Single Image Finding."""
    impression = hd.sr.ContainerContentItem(name=INDIVIDUAL_IMPRESSION, relationship_type=_INFERRED_FROM)
    _set_children(
        impression,
        [
            _code(codes.DCM.RenderingIntent, PRESENTATION_OPTIONAL, _CONCEPT_MOD),
            _single_image_finding(index, item, lesion),
        ],
    )
    return impression


def _single_image_finding(index: int, item: AnalysedFrame, lesion: Lesion) -> hd.sr.CodeContentItem:
    """TID 4006: the finding, its rendering intent, the finder's identity, its certainty, scores and geometry."""
    finding = _code(codes.DCM.SingleImageFinding, SELECTED_REGION, _CONTAINS)
    children: list[pydicom.Dataset] = [
        _code(codes.DCM.RenderingIntent, PRESENTATION_OPTIONAL, _CONCEPT_MOD),
        *algorithm_identification(item.analysis.segmenter),
    ]
    if lesion.detection_probability is not None:
        children.append(_percent(codes.DCM.CertaintyOfFinding, lesion.detection_probability))
    malignancy = _percent(codes.DCM.ProbabilityOfCancer, lesion.malignancy_probability)
    # The score is DL-M's, not the finder's: its own TID 4019 says so.
    _set_children(malignancy, [*algorithm_identification(item.analysis.classifier)])
    children.append(malignancy)
    offset = item.frame.scan_region_xywh[:2]
    x, y, width, height = lesion.bbox_xywh
    centre = np.array([[x + offset[0] + width / 2.0, y + offset[1] + height / 2.0]], dtype=np.float32)
    for name, graphic_type, data in (
        (codes.DCM.Center, hd.sr.GraphicTypeValues.POINT, centre),
        (codes.DCM.Outline, hd.sr.GraphicTypeValues.POLYLINE, closed_outline(lesion.outline_xy, offset)),
    ):
        scoord = hd.sr.ScoordContentItem(
            name=name, graphic_type=graphic_type, graphic_data=data, relationship_type=_PROPERTIES
        )
        _set_children(scoord, [_by_reference("SELECTED FROM", index)])
        children.append(scoord)
    _set_children(finding, children)
    return finding


def _summary(
    name: Code,
    container_name: Code,
    performed: Code,
    kind: Code,
    models: Sequence[ModelInfo],
    images: Sequence[int],
) -> hd.sr.CodeContentItem:
    """TID 4000 rows 6-9: a summary (CID 6042) inferred from TID 4015/4016, one TID 4017/4018 per model.

    Only algorithms that ran are listed (PS3.16 TID 4000): with no model or image, the summary is "Not Attempted".
    """
    if not models or not images:
        return _code(name, codes.DCM.NotAttempted, _CONTAINS)
    summary = _code(name, codes.DCM.Succeeded, _CONTAINS)
    container = hd.sr.ContainerContentItem(name=container_name, relationship_type=_INFERRED_FROM)
    entries = []
    for model in models:
        entry = _code(performed, kind, _CONTAINS)
        _set_children(entry, [*algorithm_identification(model), *(_by_reference("INFERRED FROM", i) for i in images)])
        entries.append(entry)
    _set_children(container, entries)
    _set_children(summary, [container])
    return summary


def _models(models: Iterable[ModelInfo]) -> list[ModelInfo]:
    """Distinct models in first-seen order."""
    return list(dict.fromkeys(models))


def _set_children(item: pydicom.Dataset, children: Iterable[pydicom.Dataset]) -> None:
    """Give ``item`` its Content Sequence as a plain pydicom sequence.

    highdicom's content items turn an assigned Content Sequence into its own,
    which parses every child and has no class for by-reference items
    (PS3.3 C.17.3.2.5); set through the element, the items are kept as built.
    """
    item.add_new(CONTENT_SEQUENCE, "SQ", list(children))


def _by_reference(relationship: str, library_index: int) -> pydicom.Dataset:
    """A by-reference relationship (PS3.3 C.17.3.2.5) to the ``library_index``-th Image Library entry (from 1)."""
    item = pydicom.Dataset()
    item.RelationshipType = relationship
    item.ReferencedContentItemIdentifier = [*_LIBRARY_PATH, library_index]
    return item


def _code(
    name: Code, value: Code | hd.sr.CodedConcept, relationship: hd.sr.RelationshipTypeValues
) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type=relationship)


def _percent(name: Code, probability: float) -> hd.sr.NumContentItem:
    """A probability in [0, 1] as a percentage (the CAD templates' unit), refused rather than clipped outside."""
    value = float(probability)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name.meaning} must come from a probability in [0, 1], got {probability!r}")
    return hd.sr.NumContentItem(
        name=name, value=round(100.0 * value, 2), unit=UNIT_PERCENT, relationship_type=_PROPERTIES
    )


def _view(ds: pydicom.Dataset) -> Code | hd.sr.CodedConcept | None:
    """The image's view (CID 4014): its View Code Sequence where it has one, else its View Position mapped."""
    sequence = ds.get("ViewCodeSequence")
    if sequence:
        coded = sequence[0]
        value, scheme = str(coded.get("CodeValue") or ""), str(coded.get("CodingSchemeDesignator") or "")
        # Code Meaning is Type 1 in the report: a vendor's empty one is taken from our table of the same code.
        meaning = str(coded.get("CodeMeaning") or "") or next(
            (view.meaning for view in VIEWS.values() if (view.value, view.scheme_designator) == (value, scheme)), ""
        )
        if value and scheme and meaning:
            return hd.sr.CodedConcept(value, scheme, meaning)
    return VIEWS.get(str(ds.get("ViewPosition") or "").strip().upper())


def _date(value: object) -> datetime.date | None:
    """A DA value (PS3.5 6.2) as a date, ``None`` when absent or malformed."""
    try:
        return datetime.datetime.strptime(str(value or "").strip(), "%Y%m%d").date()
    except ValueError:
        return None


def _time(value: object) -> datetime.time | None:
    """A TM value (PS3.5 6.2: HH, HHMM, HHMMSS, with an optional fraction) as a time, ``None`` when absent or
    malformed. Not strptime: it takes one-digit fields, reading "0930" as 09:03:00."""
    text = str(value or "").strip()
    if not text:
        return None
    try:
        parsed = TM(text)
    except ValueError:
        return None
    return datetime.time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)
