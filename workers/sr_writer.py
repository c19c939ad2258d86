"""The AI report as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report).

One report per study, built with highdicom. Content tree (PS3.16)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")        TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants  TID 1204
      HAS OBS CONTEXT  Device observer (BreastAI, version)       TID 1001/1002/1004
      HAS CONCEPT MOD  Procedure Reported = (47079000, SCT, "Ultrasonography of breast")
      CONTAINS         Image Library                             TID 1600
      CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
        per lesion:  Measurement Group                           TID 1410
          Tracking Identifier "Lesion N" + Tracking UID         TID 4108
          Finding = (4147007, SCT, "Mass"), Finding Site = (76752008, SCT, "Breast")
                    with laterality when the image says
          Image Region = SCOORD POLYLINE (closed outline) on the source image/frame
          Algorithm = segmenter name + version               TID 4019
          Measurement (111047, DCM, "Probability of cancer"), unit (1, UCUM, "no units"),
                    classifier as its algorithm                TID 300 + TID 4019
          Measurement (103339001, SCT, "Long axis") in mm, when spacing is known,
                    segmenter as its algorithm
        per analysed image without lesion: Measurement Group    TID 1501
          Finding = Mass, source image, segmenter as algorithm,
          Qualitative evaluation (121052, DCM, "Presence of property") = (272519000, SCT, "Absent")
      CONTAINS CONTAINER (C0034375, UMLS, "Qualitative Evaluations")   TID 1500 row 12
        TEXT (121106, DCM, "Comment") = advisory, not-for-diagnostic-use notice naming models

Code choices: "Probability of cancer" (DCM 111047, CID 6048) is the concept
DICOM's own Mammography CAD SR uses for a malignancy score; "no units"
(UCUM "1", CID 7181) is the dimensionless unit; "Long axis" (SCT 103339001,
CID 7469) is the generic size measurement for a longest diameter; "Mass"
(SCT 4147007) is the BI-RADS ultrasound lexicon's lesion type, with the site
"Breast" (SCT 76752008); "Presence of property" (DCM 121052) = "Absent"
(SCT 272519000, CID 240/241) states that the segmenter found no mass in an
image, so that an empty result reads as a statement, not as a gap.

Every score is advisory and must be traceable to the model and version that
produced it: each measurement carries its own TID 4019 algorithm
identification (name, version, and the weights' sha256 as a parameter), the
series description says "(advisory)", and the comment says "not for
diagnostic use". The document is PRELIMINARY and UNVERIFIED: no person has
signed it.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.sr.sop import _SR  # the SR document base class: ours are built on it too (workers.mammo_cad_sr)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.inference.decisions import BM_ROLE, lh_score
from models.inference.findings import FamilyScore, ImageAnalysis, Lesion, ModelInfo
from models.inference.fusion import BreastFusion
from workers.advisory import NOT_FOR_DIAGNOSTIC_USE
from workers.dicom_reader import SourceFrame
from workers.frame_geometry import frame_plane
from workers.uids import derive_uid


def _package_version() -> str:
    try:
        return importlib.metadata.version("breastai")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


SERIES_DESCRIPTION = "BreastAI report (advisory)"
DISCLAIMER = f"{NOT_FOR_DIAGNOSTIC_USE}. Every score is advisory."
DEFAULT_DEVICE_OBSERVER_UID = derive_uid("breastai", "device-observer")

PROCEDURE_US_BREAST = Code("47079000", "SCT", "Ultrasonography of breast")
PROCEDURE_MAMMOGRAPHY = Code("71651007", "SCT", "Mammography")
PROCEDURES = {"US": PROCEDURE_US_BREAST, "MG": PROCEDURE_MAMMOGRAPHY}
FINDING_MASS = Code("4147007", "SCT", "Mass")
# A mammography finder proposes regions of any kind (mass, distortion, asymmetry, calcifications) without
# naming which: the generic "morphologically abnormal structure" rather than a type it did not decide.
FINDING_ABNORMALITY = Code("49755003", "SCT", "Morphologically abnormal structure")
FINDING_TYPES = {"US": FINDING_MASS, "MG": FINDING_ABNORMALITY}
# The finder's probability that a region is an abnormality at all: "Certainty of Finding" as DICOM's Mammography
# CAD SR reports a detection's certainty, in percent.
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
UNIT_PERCENT = Code("%", "UCUM", "percent")
SITE_BREAST = Code("76752008", "SCT", "Breast")
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
UNIT_NONE = Code("1", "UCUM", "no units")
UNIT_MM = Code("mm", "UCUM", "millimeter")
PRESENCE = Code("121052", "DCM", "Presence of property")
ABSENT = Code("272519000", "SCT", "Absent")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")
# Private codes (PS3.16 8.2: a "99" prefix marks a local coding scheme) for what no standard code says.
BREASTAI_SCHEME = "99BREASTAI"
# A lesion tracked through a volume's transverse frames, looked for on the sagittal plane reconstructed through it
# (models.inference.volume.seen_on_sagittal); no standard concept says this.
SEEN_ON_SAGITTAL = Code("SAGITTAL-CHECK", BREASTAI_SCHEME, "Outlined on reconstructed sagittal plane")
PROBABILITY_BIRADS_HIGH = Code("P-BIRADS45", BREASTAI_SCHEME, "Probability of BI-RADS 4 or 5 assessment")
AT_OR_ABOVE_OPERATING_POINT = Code("AT-OR-ABOVE-OP", BREASTAI_SCHEME, "At or above the model's operating point")
BELOW_OPERATING_POINT = Code("BELOW-OP", BREASTAI_SCHEME, "Below the model's operating point")
FOUR_A_RESTRATIFICATION = Code("BIRADS4A-RESTRAT", BREASTAI_SCHEME, "BI-RADS 4A re-stratification, if assessed 4A")
FOUR_A_RECOMMENDATIONS = {
    "downgrade to BI-RADS 3": Code("DOWNGRADE-3", BREASTAI_SCHEME, "Downgrade to BI-RADS 3"),
    "keep BI-RADS 4A": Code("KEEP-4A", BREASTAI_SCHEME, "Keep BI-RADS 4A"),
    "upgrade above BI-RADS 4A": Code("UPGRADE", BREASTAI_SCHEME, "Upgrade above BI-RADS 4A"),
}
LATERALITY_CODES = {  # CID 244 "Laterality"
    "L": Code("7771000", "SCT", "Left"),
    "R": Code("24028007", "SCT", "Right"),
    "B": Code("51440002", "SCT", "Right and left"),
}


@dataclass(frozen=True)
class ReportContext:
    """Who made a result object: equipment and observer identity.

    Attributes
    ----------
    manufacturer, manufacturer_model_name, software_versions
        General Equipment module (PS3.3 C.7.5.1) of every result object.
    device_observer_uid
        Device Observer UID (TID 1004); stable for the installation so that
        reports from one install can be told apart from another's.
    institution_name
        Institution Name, when the site wants it in the results.
    """

    manufacturer: str = "BreastAI project"
    manufacturer_model_name: str = "BreastAI"
    software_versions: str = _package_version()
    device_observer_uid: str = DEFAULT_DEVICE_OBSERVER_UID
    institution_name: str | None = None

    def sr_document_arguments(self) -> dict[str, Any]:
        """What every SR of ours tells highdicom about its equipment and state (General Equipment, PS3.3
        C.7.5.1; SR Document General, C.17.2): complete, not final, not verified: an advisory machine result
        that no person has signed."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.manufacturer_model_name,
            "software_versions": self.software_versions,
            "institution_name": self.institution_name,
            "is_complete": True,
            "is_final": False,
            "is_verified": False,
        }


@dataclass(frozen=True)
class AnalysedFrame:
    """One source frame and what the pipeline found in it."""

    frame: SourceFrame
    analysis: ImageAnalysis


MeasurementGroup = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations

# Where a frame's groups are built before the report's UID is known: their Tracking Unique Identifier until
# build_report sets it (derived from the report's UID, as it always was). It never leaves build_report.
_TRACKING_UID_UNSET = "2.25.0"
_TRACKING_UNIQUE_IDENTIFIER = ("112040", "DCM")  # TID 4108 row 2: Tracking Unique Identifier


def build_report(
    analysed: Sequence[AnalysedFrame],
    evidence: Sequence[pydicom.Dataset],
    series_instance_uid: str,
    sop_instance_uid: str,
    context: ReportContext,
    series_number: int = 9901,
    instance_number: int = 1,
    previous_versions: Sequence[pydicom.Dataset] = (),
    breast_fusions: Sequence[BreastFusion] = (),
    not_analysed: Sequence[str] = (),
    frame_groups: Sequence[Sequence[MeasurementGroup]] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the study's AI report, a TID 1500 Measurement Report.

    Parameters
    ----------
    analysed
        Every analysed frame with its findings, at least one.
    evidence
        Headers of every instance of the study, analysed or not; all are
        listed in the Current Requested Procedure Evidence Sequence (PS3.3
        C.17.2) and patient/study attributes are copied from them.
    series_instance_uid, sop_instance_uid
        UIDs of the report (derived by the caller, so that a redelivered job
        produces the same report).
    context
        Equipment and device observer identity.
    series_number, instance_number
        Series Number and Instance Number of the report.
    previous_versions
        Reports this one revises (a study that gained instances after its
        report was delivered): listed in the Predecessor Documents Sequence
        (PS3.3 C.17.2), so a viewer shows a revision, not a second opinion.
    breast_fusions
        Breasts with both a DL-U-scored ultrasound lesion and a DL-M-scored
        mammography finding: one TID 1501 group each, with both branches'
        highest scores and their late fusion, each with its own TID 4019.
    not_analysed
        One sentence per instance of the study that was not analysed, naming
        it and why (a colour Doppler image, a For Processing mammogram...):
        each a Comment beside the advisory notice, so the radiologist sees
        what was not looked at.
    frame_groups
        :func:`measurement_groups` of each analysed frame, in order, where
        the caller built them beforehand (the worker does, on each image's
        thread: most of a report's build); built here when not given. Their
        Tracking Unique Identifiers are set here, derived from the report's.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        PRELIMINARY, UNVERIFIED, COMPLETE document in Explicit VR Little
        Endian.

    Raises
    ------
    ValueError
        Nothing analysed, no evidence, evidence from more than one study, an
        analysed instance missing from the evidence, or a lesion outline that
        is not a polygon.
    """
    if not analysed:
        raise ValueError("build_report needs at least one analysed frame")
    if not evidence:
        raise ValueError("build_report needs the study's instances as evidence")
    study_uids = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(study_uids) != 1:
        raise ValueError(f"evidence spans several studies: {sorted(study_uids)}")
    study_uid = study_uids.pop()
    evidence_uids = {str(ds.SOPInstanceUID) for ds in evidence}
    for item in analysed:
        if item.frame.study_instance_uid != study_uid:
            raise ValueError(
                f"analysed instance {item.frame.sop_instance_uid} belongs to study "
                f"{item.frame.study_instance_uid}, not {study_uid}"
            )
        if item.frame.sop_instance_uid not in evidence_uids:
            raise ValueError(f"analysed instance {item.frame.sop_instance_uid} is not in the evidence")

    if frame_groups is None:
        frame_groups = [measurement_groups(item) for item in analysed]
    if len(frame_groups) != len(analysed):
        raise ValueError(f"{len(frame_groups)} frames' measurement groups for {len(analysed)} analysed frames")
    groups: list[MeasurementGroup] = []
    for item, built in zip(analysed, frame_groups, strict=True):
        frame_part = str(item.frame.frame_number or 0)
        if item.analysis.lesions:
            keys = [str(number) for number in range(1, len(item.analysis.lesions) + 1)]
        else:
            keys = ["no-lesion"]
        if len(built) != len(keys):
            raise ValueError(
                f"{len(built)} measurement groups for {len(keys)} findings of {item.frame.sop_instance_uid}"
            )
        for group, key in zip(built, keys, strict=True):
            _set_tracking_uid(group, derive_uid(sop_instance_uid, item.frame.sop_instance_uid, frame_part, key))
            groups.append(group)

    groups.extend(_fusion_group(fusion, sop_instance_uid) for fusion in breast_fusions)

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=context.device_observer_uid,
            name=context.manufacturer_model_name,
            manufacturer_name=context.manufacturer,
            model_name=f"{context.manufacturer_model_name} {context.software_versions}"[:64],
        ),
    )
    library_images = unique_by_uid([item.frame.dataset for item in analysed])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedures(analysed),
        imaging_measurements=groups,
        referenced_images=library_images,
    )
    report[0].ContentSequence.append(_disclaimer_container(analysed, not_analysed))

    # highdicom copies patient and study from the first evidence item.
    unique_evidence = unique_by_uid(list(evidence))
    unique_evidence[0] = patient_study_header(unique_evidence[0])
    root = report[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=unique_evidence,
        # The root container without its tree, which is put in place below (see attach_content): highdicom would
        # deep-copy the tree, parse the copy back into content items and search it for image references, two
        # thirds of the report's build for a tree its own classes have just built.
        content=without_children(root),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        series_description=SERIES_DESCRIPTION,
        previous_versions=list(previous_versions) or None,
        **context.sr_document_arguments(),
    )
    attach_content(sr, root, unique_evidence)
    for keyword in _PATIENT_STUDY_TYPE3:
        if keyword in unique_evidence[0] and keyword not in sr:
            sr[keyword] = unique_evidence[0][keyword]
    return sr


def without_children(root: pydicom.Dataset) -> pydicom.Dataset:
    """The root content item's attributes, sharing its elements, with an empty Content Sequence."""
    shell = pydicom.Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []
    return shell


def attach_content(sr: _SR, root: pydicom.Dataset, evidence: Sequence[pydicom.Dataset]) -> None:
    """Give ``sr`` the content tree under ``root``, as highdicom's constructor does when given the whole tree.

    What the constructor does with its ``content`` (highdicom 0.28,
    ``highdicom.sr.sop._SR``): the root's elements become the document's,
    shared, not copied; its own tree (``content``) is a parsed deep copy;
    and every image or composite object the tree references must be in the
    evidence, else ValueError. Here the document gets the root's Content
    Sequence element, ``content`` is the tree itself (a ContentSequence of
    highdicom's content items, as the parsed copy would be), and the
    references are checked by walking the tree. The encoded document is the
    same (tests/unit/test_sr_writer.py compares it with the constructor's).

    Raises
    ------
    ValueError
        A referenced instance is not in ``evidence`` (as highdicom raises).
    TypeError
        ``root`` is not a highdicom container content item.
    """
    if not isinstance(root, hd.sr.ContainerContentItem):
        raise TypeError(f"the report's root must be a highdicom ContainerContentItem, got {type(root).__name__}")
    sequence = root[CONTENT_SEQUENCE]
    given = {str(ds.SOPInstanceUID) for ds in evidence}
    missing = sorted(_referenced_instances(sequence.value) - given)
    if missing:
        raise ValueError(
            "No evidence was provided for the following SOP instances, which are referenced in the document "
            f"content: {', '.join(missing)}"
        )
    sr[CONTENT_SEQUENCE] = sequence
    sr._content = hd.sr.ContentSequence([root], is_root=True)  # what the ``content`` property reads


CONTENT_SEQUENCE = 0x0040A730  # (0040,A730) Content Sequence
_REFERENCING = ("IMAGE", "COMPOSITE")  # value types whose Referenced SOP Sequence names an instance (PS3.3 C.17.3)


def _referenced_instances(items: Sequence[pydicom.Dataset]) -> set[str]:
    """SOP Instance UIDs of every IMAGE and COMPOSITE content item in the tree under ``items``."""
    found: set[str] = set()
    stack = list(items)
    while stack:
        item = stack.pop()
        if item.get("ValueType") in _REFERENCING:
            found.update(str(ref.ReferencedSOPInstanceUID) for ref in item.ReferencedSOPSequence)
        children = item.get("ContentSequence")
        if children:
            stack.extend(children)
    return found


# Patient and General Study attributes copied into every result object
# (PS3.3 C.7.1.1, C.7.2.1), with the Type 2 ones that highdicom reads.
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_PATIENT_STUDY_TYPE3 = ("StudyDescription", "IssuerOfPatientID", "PatientAge")
# PS3.5 Table 6.2-1: DA is YYYYMMDD, TM is HH[MM[SS[.F{1,6}]]].
_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_IDENTITY = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SpecificCharacterSet")


def patient_study_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The patient/study part of a source header, made safe to copy.

    Vendor headers break highdicom in small ways: a Type 2 attribute left
    out, a time written "14:04:38" (ACR-NEMA style), a sex outside M/F/O.
    The copy keeps the identity UIDs, fills missing Type 2 attributes with
    empty values, repairs separator-style dates and times, and empties
    values that still do not conform, rather than refusing the study.
    """
    header = pydicom.Dataset()
    for keyword in _IDENTITY + _PATIENT_STUDY_TYPE2 + _PATIENT_STUDY_TYPE3:
        if keyword in ds:
            # A copy of the element: the repairs below set values, and a shared element would rewrite the source.
            header[keyword] = copy.deepcopy(ds[keyword])
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    header.StudyDate = _conformant(str(header.StudyDate or ""), _DA, "-./")
    header.StudyTime = _conformant(str(header.StudyTime or ""), _TM, ":")
    header.PatientBirthDate = _conformant(str(header.PatientBirthDate or ""), _DA, "-./")
    if str(header.PatientSex or "").strip().upper() not in ("M", "F", "O"):
        header.PatientSex = ""
    if "PatientAge" in header and not re.fullmatch(r"\d{3}[DWMY]", str(header.PatientAge or "")):
        del header.PatientAge
    return header


def _conformant(value: str, pattern: re.Pattern[str], separators: str) -> str:
    """``value`` if it matches the VR's pattern, else without separators if that does, else ""."""
    for candidate in (value.strip(), value.strip().translate({ord(c): None for c in separators})):
        if candidate and pattern.fullmatch(candidate):
            return candidate
    return ""


def measurement_groups(item: AnalysedFrame) -> tuple[MeasurementGroup, ...]:
    """The report's groups for one analysed frame: a TID 1410 group per lesion, or one TID 1501 "no lesion" group.

    Their Tracking Unique Identifiers are left for :func:`build_report` to set (they derive from the report's UID,
    which depends on every frame of the study); everything else is the frame's alone, so each frame's groups can be
    built on its own thread while others are analysed.
    """
    if not item.analysis.lesions:
        return (_no_lesion_group(item.frame, item.analysis),)
    return tuple(
        _lesion_group(item.frame, item.analysis, lesion, number)
        for number, lesion in enumerate(item.analysis.lesions, start=1)
    )


def _set_tracking_uid(group: MeasurementGroup, uid: str) -> None:
    """Give ``group`` its Tracking Unique Identifier (the UIDREF item :func:`measurement_groups` left unset)."""
    for item in group[0].ContentSequence:
        code = item.ConceptNameCodeSequence[0]
        if (str(code.CodeValue), str(code.CodingSchemeDesignator)) == _TRACKING_UNIQUE_IDENTIFIER:
            if str(item.UID) != _TRACKING_UID_UNSET:
                raise ValueError(f"measurement group already tracked as {item.UID}: built for another report")
            item.UID = uid
            return
    raise ValueError("measurement group without a Tracking Unique Identifier")


def _lesion_group(
    frame: SourceFrame, analysis: ImageAnalysis, lesion: Lesion, number: int
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one lesion: outline, probability, size."""
    tracking = hd.sr.TrackingIdentifier(uid=_TRACKING_UID_UNSET, identifier=f"Lesion {number}")
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY_OF_CANCER,
            value=_probability(lesion.malignancy_probability),
            unit=UNIT_NONE,
            algorithm_id=algorithm_identification(analysis.classifier),
        )
    ]
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    for score in lesion.family_scores[1:] if lesion.family_scores else ():
        # The first family is the primary score above; every other family adds its own, with its own TID 4019.
        measurements.append(
            hd.sr.Measurement(
                name=PROBABILITY_OF_CANCER if score.task == "malignancy" else PROBABILITY_BIRADS_HIGH,
                value=_probability(score.probability),
                unit=UNIT_NONE,
                algorithm_id=algorithm_identification(score.model),
            )
        )
    for score in lesion.family_scores:
        evaluations.append(_family_call(score))
    if lesion.co_decision is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=FOUR_A_RESTRATIFICATION, value=FOUR_A_RECOMMENDATIONS[lesion.co_decision.recommendation.value]
            )
        )
    if lesion.seen_on_sagittal is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=SEEN_ON_SAGITTAL, value=codes.SCT.Yes if lesion.seen_on_sagittal else codes.SCT.No
            )
        )
    if lesion.detection_probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=CERTAINTY_OF_FINDING,
                value=round(100.0 * _probability(lesion.detection_probability), 2),
                unit=UNIT_PERCENT,
                algorithm_id=algorithm_identification(analysis.segmenter),
            )
        )
    if frame.row_spacing_mm is not None and frame.column_spacing_mm is not None:
        measurements.append(
            hd.sr.Measurement(
                name=LONG_AXIS,
                value=round(lesion.longest_diameter_mm(frame.row_spacing_mm, frame.column_spacing_mm), 2),
                unit=UNIT_MM,
                algorithm_id=algorithm_identification(analysis.segmenter),
            )
        )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=lesion_region(frame, lesion),
        finding_type=FINDING_TYPES.get(analysis.modality, FINDING_MASS),
        algorithm_id=algorithm_identification(analysis.segmenter),
        finding_sites=[_finding_site(frame.dataset)],
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def _fusion_group(fusion: BreastFusion, report_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one breast: DL-U's and DL-M's highest lesion scores and their late fusion, named as such."""
    side = LATERALITY_CODES[fusion.laterality].meaning
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY_OF_CANCER,
            value=_probability(probability),
            unit=UNIT_NONE,
            algorithm_id=algorithm_identification(model),
        )
        for probability, model in (
            (fusion.us_probability, fusion.us_model),
            (fusion.mg_probability, fusion.mg_model),
            (fusion.fused_probability, fusion.fusion_model),
        )
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(report_uid, "breast-fusion", fusion.laterality),
            identifier=f"{side} breast: ultrasound and mammography",
        ),
        finding_type=FINDING_MASS,
        algorithm_id=algorithm_identification(fusion.fusion_model),
        finding_sites=[
            hd.sr.FindingSite(anatomic_location=SITE_BREAST, laterality=LATERALITY_CODES[fusion.laterality])
        ],
        measurements=measurements,
    )


def _family_call(score: FamilyScore) -> hd.sr.QualitativeEvaluation:
    """One family's decision at its operating point, named after the family, with the model's TID 4019 attached."""
    name = Code(
        f"CALL-{score.family.upper()}",
        BREASTAI_SCHEME,
        f"{score.model.name} call (threshold {score.threshold:.3f})"[:64],
    )
    evaluation = hd.sr.QualitativeEvaluation(
        name=name, value=AT_OR_ABOVE_OPERATING_POINT if score.positive else BELOW_OPERATING_POINT
    )
    # highdicom's QualitativeEvaluation takes no algorithm; TID 4019 goes under the CODE item as HAS CONCEPT MOD.
    evaluation[0].ContentSequence = hd.sr.ContentSequence(
        [*algorithm_identification(score.model)], is_root=False, is_sr=True
    )
    return evaluation


def _no_lesion_group(frame: SourceFrame, analysis: ImageAnalysis) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group stating that no mass was found in one image."""
    source = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=frame.sop_class_uid,
        referenced_sop_instance_uid=frame.sop_instance_uid,
        referenced_frame_numbers=[frame.frame_number] if frame.frame_number else None,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_TRACKING_UID_UNSET, identifier="No lesion detected"),
        finding_type=FINDING_TYPES.get(analysis.modality, FINDING_MASS),
        algorithm_id=algorithm_identification(analysis.segmenter),
        finding_sites=[_finding_site(frame.dataset)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=PRESENCE, value=ABSENT)],
        source_images=[source],
    )


def lesion_region(frame: SourceFrame, lesion: Lesion) -> hd.sr.ImageRegion | hd.sr.ImageRegion3D:
    """The lesion's outline as TID 1410's Image Region: SCOORD3D where the frame has a plane, else SCOORD.

    A frame of an enhanced volume that places it in a Frame of Reference
    (workers.frame_geometry) gets the outline in that frame's patient
    coordinates, a closed, coplanar POLYGON (PS3.3 C.18.9.1.2), so that a
    viewer places the lesion in the volume whatever plane it shows. Every
    other image keeps the closed POLYLINE on its own pixels (C.18.6.1.2),
    which references the image and frame and is what OHIF draws.
    """
    outline = closed_outline(lesion.outline_xy, frame.scan_region_xywh[:2])
    plane = frame_plane(frame.dataset, frame.frame_number)
    if plane is None:
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=_source_image_for_region(frame),
        )
    return hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
        graphic_data=plane.to_reference(outline),
        frame_of_reference_uid=plane.frame_of_reference_uid,
    )


def closed_outline(outline_xy: npt.NDArray[np.floating], offset_xy: Sequence[int]) -> npt.NDArray[np.float32]:
    """The outline in frame coordinates, closed as SCOORD POLYLINE requires.

    PS3.3 C.18.6.1.2: a closed POLYLINE repeats its first point at the end,
    and image coordinates start at the top-left corner of the top-left
    pixel, so the centre of pixel (i, j) is (i + 0.5, j + 0.5). The
    pipeline's outline holds pixel indices within the scan-region crop,
    so the crop's offset and the half pixel are added.

    Raises
    ------
    ValueError
        If the outline is not (N, 2) with at least three distinct points.
    """
    points = np.asarray(outline_xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"lesion outline must have shape (N, 2), got {points.shape}")
    if len(np.unique(points, axis=0)) < 3:
        raise ValueError(f"lesion outline needs at least 3 distinct points, got {len(np.unique(points, axis=0))}")
    points = points + np.asarray(offset_xy[:2], dtype=np.float64) + 0.5
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points.astype(np.float32)


def _procedures(analysed: Sequence[AnalysedFrame]) -> list[Code]:
    """Procedure Reported (TID 1500 row 4): one code per kind of image analysed, in a stable order."""
    modalities = sorted({item.analysis.modality for item in analysed}, key=lambda m: (m != "US", m))
    return [PROCEDURES.get(modality, PROCEDURE_US_BREAST) for modality in modalities]


def _probability(value: float) -> float:
    """The classifier's probability, refused rather than clipped when out of [0, 1]."""
    probability = float(value)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"malignancy probability must be in [0, 1], got {value!r}")
    return probability


def _source_image_for_region(frame: SourceFrame) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=frame.sop_class_uid,
        referenced_sop_instance_uid=frame.sop_instance_uid,
        referenced_frame_numbers=[frame.frame_number] if frame.frame_number else None,
    )


@functools.lru_cache(maxsize=256)
def algorithm_identification(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for one model; the weights' digest makes it unambiguous.

    Built once per model and shared by every item that names it (a report
    names each model a dozen times or more, and building one costs about a
    millisecond of highdicom validation): its content items are leaves that
    nothing changes after they are made, and pydicom encodes an item each
    time it appears in a sequence, so the document is the same as with one
    copy each.
    """
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"sha256={model.sha256}"] if model.sha256 else None,
    )


def image_laterality(ds: pydicom.Dataset) -> str:
    """The imaged breast, "L", "R" or "B", from Image Laterality or else the series' Laterality (PS3.3 C.7.6.2,
    C.7.3.1); "" when the header does not say."""
    side = str(ds.get("ImageLaterality") or ds.get("Laterality") or "").strip().upper()
    return side if side in LATERALITY_CODES else ""


def _finding_site(ds: pydicom.Dataset) -> hd.sr.FindingSite:
    """Breast, with the image's laterality when the header gives one."""
    return hd.sr.FindingSite(anatomic_location=SITE_BREAST, laterality=LATERALITY_CODES.get(image_laterality(ds)))


def _four_a_inputs(lesion: Lesion) -> tuple[str, str]:
    """Name and version of the LH and BM models whose calls made the lesion's 4A re-stratification.

    They are the models the pipeline chose for it.

    Raises
    ------
    ValueError
        The lesion has a re-stratification but not both scores it reads.
    """
    by_family = {s.family: s for s in lesion.family_scores}
    lh, bm = lh_score(by_family), by_family.get(BM_ROLE)
    if lh is None or bm is None:
        raise ValueError(
            "a lesion carries a BI-RADS 4A re-stratification without the LH and BM scores it was made from"
        )
    return (f"{lh.model.name} {lh.model.version}", f"{bm.model.name} {bm.model.version}")


def _disclaimer_container(
    analysed: Sequence[AnalysedFrame], not_analysed: Sequence[str] = ()
) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container holding the advisory notice and the models, then what was not analysed and why."""
    models = sorted(
        {stage for a in analysed for stage in a.analysis.segmenter.stages()}
        | {(a.analysis.classifier.name, a.analysis.classifier.version) for a in analysed}
        | {
            (s.model.name, s.model.version)
            for a in analysed
            for lesion in a.analysis.lesions
            for s in lesion.family_scores
        }
    )
    notes = sorted(
        {
            f"{s.model.name}: {note}"
            for a in analysed
            for lesion in a.analysis.lesions
            for s in lesion.family_scores
            for note in s.notes
        }
    )
    text = f"{DISCLAIMER} Models: " + ", ".join(f"{name} {version}" for name, version in models) + "."
    four_a_inputs = sorted(
        {_four_a_inputs(lesion) for a in analysed for lesion in a.analysis.lesions if lesion.co_decision is not None}
    )
    if four_a_inputs:
        read = "; ".join(f"{lh} (BI-RADS 4/5) with {bm} (malignancy)" for lh, bm in four_a_inputs)
        text += (
            " The BI-RADS 4A re-stratification applies only to lesions a radiologist assessed as 4A;"
            f" it reads {read}, each at its operating point."
        )
    if notes:
        text += " Inputs: " + "; ".join(notes) + "."
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(name=COMMENT, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            for value in (text, *not_analysed)
        ]
    )
    return container


def unique_by_uid(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Datasets in order, each SOP Instance UID once."""
    seen: set[str] = set()
    unique: list[pydicom.Dataset] = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            unique.append(ds)
    return unique
