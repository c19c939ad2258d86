"""Lesion masks as a DICOM Segmentation (PS3.3 A.51, C.8.20).

The SR says what was found and the overlay shows where, burned into
pixels; the Segmentation carries the masks themselves, so an AI-aware
viewer (OHIF and other IHE AI Results consumers) can draw, hide and
measure them over the source image. One SEG per analysed image (or frame
of a multi-frame image), one BINARY segment per lesion.

How the source is referenced. The SEG frame is the source frame pixel for
pixel (Spatial Locations Preserved YES): every SEG frame names its source
instance, and for a multi-frame source its frame, in the Derivation Image
functional group (C.7.6.16.2.6), and the Source Image Sequence lists the
same. Breast ultrasound and mammography are 2D images without a patient-
space plane (no Image Position / Orientation (Patient)), so the SEG carries
no Plane Position or Orientation either; highdicom builds such a SEG only
for a single source frame ("no coordinate system"), which is what a
single-frame source gives it. For a frame of a multi-frame ultrasound
loop, highdicom is given the header as if it were that single frame and
the frame number is then written into the references; see
:func:`_restore_reference`. The source's Frame of Reference UID, where it
has one (mammograms may), is copied.

UIDs are derived with :func:`workers.uids.derive_uid` from the study, the
model key and the source (instance and frame), as the overlays' are, under
their own tag, so a redelivered job yields the same SEG and the PACS keeps
one copy. The SEG series is per source series: the SEG copies the source's
Frame of Reference, and a series has a single one (PS3.3 C.7.4.1.1.1).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.sr.coding import Code

from models.inference.findings import ModelInfo
from workers.advisory import NOT_FOR_DIAGNOSTIC_USE
from workers.dicom_reader import SourceFrame
from workers.sr_writer import (
    FINDING_MASS,
    LATERALITY_CODES,
    SITE_BREAST,
    ReportContext,
    image_laterality,
    patient_study_header,
)
from workers.uids import derive_uid

SERIES_DESCRIPTION = "BreastAI lesion segmentation (advisory)"
# After the report (9901) and the overlay series (9902 + one per family).
SERIES_NUMBER = 9950
# Content Label is CS (PS3.3 C.10.9): at most 16 upper-case letters, digits, "_" or space.
CONTENT_LABEL = "AI_ADVISORY"
# Second part of every SEG UID derivation, where the report's and the overlays' have their pipeline name
# ("us-bmode"); their fourth part is "report"/"overlay"(-series), the SEG's "series"/"instance": never equal.
UID_TAG = "segmentation"

# CID 7150 "Segmentation Property Categories" and, under that category, CID 7159 "Lesion Segmentation
# Types". "Mass" rather than "Lesion": the report calls the same finding Finding = (4147007, SCT, "Mass")
# (the BI-RADS lexicon's term for what the segmenter outlines), and a consumer pairing the SR's
# measurement group with the SEG's segment should read one concept, not two.
CATEGORY_ABNORMAL = Code("49755003", "SCT", "Morphologically abnormal structure")
PROPERTY_MASS = FINDING_MASS
# A mammography finder's region may be a mass, a distortion, an asymmetry or calcifications: the generic
# "Lesion" of CID 7159, where the report's finding is the generic abnormal structure.
PROPERTY_LESION = Code("52988006", "SCT", "Lesion")
# CID 7162 "Algorithm Families": the segmenter is a neural network.
ALGORITHM_FAMILY_AI = Code("123110", "DCM", "Artificial Intelligence")
# Recommended display colours (RGB), cycled: those of the overlay's outlines (workers.overlay_render), so
# "Lesion N" has one colour in the overlay and in a SEG viewer.
_SEGMENT_COLOURS = ((0, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0))
# Header attributes of the source that the SEG copies or highdicom reads, beyond patient and study.
_SOURCE_IMAGE_KEYWORDS = (
    "Modality",
    "Rows",
    "Columns",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    # Not Pixel Spacing: highdicom would turn it into a Pixel Measures functional group without a Slice
    # Thickness, which a 2D image has none of and which highdicom's own reader then refuses. The SEG
    # shares the source's pixel grid, so a viewer measures with the source's calibration.
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    # The source's acquisition equipment, which highdicom lists as Contributing Equipment.
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
)
# Any single-frame image SOP class, to let highdicom build the SEG of one frame of a multi-frame source
# (Secondary Capture Image Storage; its IOD has no Frame of Reference to insist on).
_SINGLE_FRAME_STAND_IN = "1.2.840.10008.5.1.4.1.1.7"


def segmentation_uids(frame: SourceFrame, model_key: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the SEG of ``frame``, derived, not drawn.

    Equal for an equal study, model key, source series, instance and frame;
    the frame part is written as the consumer writes its sources,
    ``<SOP Instance UID>#<frame number or 1>``.
    """
    study = frame.study_instance_uid
    source = f"{frame.sop_instance_uid}#{frame.frame_number or 1}"
    series_uid = derive_uid(study, UID_TAG, model_key, "series", frame.series_instance_uid)
    sop_uid = derive_uid(study, UID_TAG, model_key, "instance", source)
    return series_uid, sop_uid


def build_segmentation(
    frame: SourceFrame,
    masks: Sequence[npt.NDArray[np.bool_]],
    labels: Sequence[str],
    algorithm: ModelInfo,
    context: ReportContext,
    model_key: str,
) -> pydicom.Dataset | None:
    """Build the DICOM Segmentation holding the lesion masks of one analysed frame.

    A Segmentation Image Storage instance (PS3.3 A.51; Segmentation Image
    module C.8.20.2) in the source's patient, study and Frame of Reference,
    with one BINARY segment per lesion: category "Morphologically abnormal
    structure" (SCT 49755003), type "Mass" (SCT 4147007), anatomic region
    "Breast", algorithm type AUTOMATIC with the model's name and version in
    the Segment Algorithm Identification. It is the segmentation object of
    the IHE Radiology "AI Results" (AIR) profile, which displays it over the
    source image; its Content Label, Content Description, Series
    Description and Image Comments say that it is an advisory AI result,
    not for diagnostic use. The frame of an empty mask is left out
    (highdicom ``omit_empty_frames``, which keeps them all only when every
    mask is empty); masks are bit-packed (Bits Allocated 1).

    Parameters
    ----------
    frame
        The analysed source frame; its header gives patient, study, series,
        Frame of Reference and the reference (instance, and frame number for
        a multi-frame source).
    masks
        One boolean mask per lesion, each the whole source frame's shape
        (Rows, Columns); integer masks of 0 and 1 are accepted too.
    labels
        Segment Label of each mask, e.g. "Lesion 1"; as many as ``masks``.
    algorithm
        The model that drew the masks: Segment Algorithm Name and Version.
    context
        Equipment identity: Manufacturer, Manufacturer's Model Name,
        Software Versions, Institution Name; the Device Serial Number
        (Type 1 in the Enhanced General Equipment module) is the
        installation's Device Observer UID.
    model_key
        The models' names and versions as the consumer joins them; part of
        the UID derivation (see :func:`segmentation_uids`), so another model
        gives another SEG and the same model the same one.

    Returns
    -------
    pydicom.Dataset or None
        The Segmentation highdicom builds, as a plain data set (see :func:`_detached`);
        Explicit VR Little Endian, Series Number :data:`SERIES_NUMBER`, the
        source's Instance Number. ``None`` when ``masks`` is empty: a SEG
        needs at least one segment, and that no lesion was found is stated
        by the SR (TID 1501 "Absent"), not by an empty SEG.

    Raises
    ------
    ValueError
        ``masks`` and ``labels`` differ in length, a label is blank, a mask
        is not 2D of the frame's shape, or holds values other than 0 and 1.
    """
    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
    if not masks:
        return None
    source = frame.dataset
    shape = (int(source.Rows), int(source.Columns))
    checked = [_checked_mask(mask, index, shape) for index, mask in enumerate(masks, start=1)]
    for index, label in enumerate(labels):
        if not label.strip():
            raise ValueError(f"label {index + 1} is blank")

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=ALGORITHM_FAMILY_AI,
        version=algorithm.version,
        parameters={"sha256": algorithm.sha256} if algorithm.sha256 else None,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label[:64],
            segmented_property_category=CATEGORY_ABNORMAL,
            segmented_property_type=PROPERTY_LESION
            if str(frame.dataset.get("Modality", "")) == "MG"
            else PROPERTY_MASS,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            anatomic_regions=[SITE_BREAST],
            display_color=hd.color.CIELabColor.from_rgb(*_SEGMENT_COLOURS[(number - 1) % len(_SEGMENT_COLOURS)]),
        )
        for number, label in enumerate(labels, start=1)
    ]
    side = LATERALITY_CODES.get(image_laterality(source))  # as the report's finding sites
    if side is not None:
        # General Anatomy macro (PS3.3 10.5): the breast's side as a modifier of the anatomic region (CID 244).
        for item in descriptions:
            item.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [hd.sr.CodedConcept.from_code(side)]
    series_uid, sop_uid = segmentation_uids(frame, model_key)
    model = f"{algorithm.name} {algorithm.version}"
    seg = hd.seg.Segmentation(
        source_images=[_source_header(frame)],
        pixel_array=_segment_array(checked),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=_instance_number(source),
        manufacturer=context.manufacturer,
        manufacturer_model_name=context.manufacturer_model_name,
        software_versions=context.software_versions,
        device_serial_number=context.device_observer_uid,
        content_label=CONTENT_LABEL,
        # LO, 64 characters: the notice first, so truncating a long model name never loses it.
        content_description=f"{NOT_FOR_DIAGNOSTIC_USE}: {model}"[:64],
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        omit_empty_frames=True,
        series_description=SERIES_DESCRIPTION,
        institution_name=context.institution_name,
    )
    # General Image module: Type 2C where the image has no patient-space orientation, as here.
    seg.PatientOrientation = _patient_orientation(source)
    seg.ImageComments = (
        f"{NOT_FOR_DIAGNOSTIC_USE}. Lesion masks drawn by {model}; {len(masks)} segment(s): {', '.join(labels)}."
    )[:10240]
    _restore_reference(seg, frame)
    return _detached(seg)


def _detached(seg: hd.seg.Segmentation) -> pydicom.Dataset:
    """The SEG as a plain data set: the same elements, without highdicom's SQLite index of its frames.

    highdicom keeps an in-memory SQLite database on each Segmentation for its frame queries, and Python's sqlite3
    lets only the thread that opened it use it: a SEG built on one of a study's image threads
    (``image_concurrency``) could be encoded on the job's thread but not copied or queried there. The worker only
    sends it; whoever needs the queries reads it back with ``highdicom.seg.segread``.
    """
    plain = pydicom.Dataset(seg)
    plain.file_meta = seg.file_meta
    plain.preamble = seg.preamble
    return plain


def _checked_mask(mask: npt.NDArray[np.generic], number: int, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """``mask`` as a boolean array, refused unless it is 2D of the frame's ``shape`` and binary."""
    array = np.asarray(mask)
    if array.shape != shape:
        raise ValueError(f"mask {number} has shape {array.shape}, the source frame is {shape}")
    if array.dtype == np.bool_:
        return array
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"mask {number} holds values other than 0 and 1")
    return array.astype(np.bool_)


def _segment_array(masks: Sequence[npt.NDArray[np.bool_]]) -> npt.NDArray[np.generic]:
    """The masks as highdicom takes them: a label map when they are disjoint, else stacked down a last axis.

    Both encode the same BINARY segments (one bit-packed frame per
    non-empty mask). A label map is the fast path: highdicom then knows the
    segments cannot overlap, where with a stack it sums the whole stack to
    find out (a third of a second for three masks on a 3000 x 2400
    mammogram). Overlapping masks take the stack, and the SEG says
    Segments Overlap YES.
    """
    label_map = np.zeros(masks[0].shape, dtype=np.uint8 if len(masks) < 256 else np.uint16)
    for number, mask in enumerate(masks, start=1):
        if label_map[mask].any():
            return np.stack(masks, axis=-1)[np.newaxis]
        label_map[mask] = number
    return label_map


def _source_header(frame: SourceFrame) -> pydicom.Dataset:
    """The source header highdicom is given: patient, study, series, image geometry; never a plane position.

    Patient and study come through :func:`~workers.sr_writer.patient_study_header`,
    which repairs what vendor headers get wrong. Image Position and
    Orientation (Patient) and functional groups are left out on purpose:
    a 2D ultrasound or projection image has no patient-space plane for the
    SEG to repeat. A frame of a multi-frame source is presented as a
    single-frame image (see :func:`_restore_reference`).
    """
    # Copies of the elements it takes, not of the whole header (a deep copy of every element cost a third of the
    # SEG's build): the caller's header goes on to the report and the overlays, and highdicom must not change it.
    # patient_study_header copies the elements it takes itself.
    source = frame.dataset
    header = patient_study_header(source)
    for keyword in _SOURCE_IMAGE_KEYWORDS:
        if keyword in source and source[keyword].value not in (None, ""):
            header[keyword] = copy.deepcopy(source[keyword])
    if frame.frame_number is not None or "NumberOfFrames" in source:
        header.SOPClassUID = _SINGLE_FRAME_STAND_IN
    return header


def _restore_reference(seg: hd.seg.Segmentation, frame: SourceFrame) -> None:
    """Put the source's real SOP Class, and its frame number, into every reference to it.

    References live in the Source Image Sequence (with the frame: Image SOP
    Instance Reference Macro, PS3.3 C.10.2), in each frame's Derivation Image
    functional group (with the frame) and in the Common Instance Reference
    module's Referenced Instance Sequence (instance only, C.12.2). highdicom
    shares one item between the first and the last; they are split here.
    """
    sop_class = frame.sop_class_uid
    series_items = [item for series in seg.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence]
    for item in series_items:
        item.ReferencedSOPClassUID = sop_class
    seg.SourceImageSequence = [_frame_reference(copy.deepcopy(item), frame) for item in seg.SourceImageSequence]
    for frame_item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame_item.DerivationImageSequence:
            for item in derivation.SourceImageSequence:
                _frame_reference(item, frame)


def _frame_reference(item: pydicom.Dataset, frame: SourceFrame) -> pydicom.Dataset:
    """``item`` naming the source's SOP Class and, for a frame of a multi-frame source, its frame number."""
    item.ReferencedSOPClassUID = frame.sop_class_uid
    if frame.frame_number is not None:
        item.ReferencedFrameNumber = frame.frame_number
    return item


def _patient_orientation(source: pydicom.Dataset) -> list[str] | str:
    """The source's Patient Orientation when it has two values (the SEG shares its pixel grid), else empty."""
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        return [str(v) for v in value]
    return ""


def _instance_number(source: pydicom.Dataset) -> int:
    """The source's Instance Number, so the SEGs of a series sort as their sources do; 1 if it has none."""
    try:
        number = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if number > 0 else 1
