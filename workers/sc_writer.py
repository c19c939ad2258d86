"""Heat-map overlays as DICOM Secondary Capture images (PS3.3 A.8.1).

Every viewer shows a Secondary Capture, so the overlay reaches the
radiologist without any AI-aware plug-in. The image is RGB with everything
burned in (see :mod:`workers.overlay_render`), hence Burned In Annotation
YES; it sits in the source's patient and study, references its source
image (and frame) in the Source Image Sequence (PS3.3 C.7.6.1.1.4), and
says in Image Comments and Derivation Description that it is an AI result,
not for diagnostic use, naming the models and their versions.
"""

from __future__ import annotations

import copy

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset

from models.inference.findings import ImageAnalysis
from workers.advisory import NOT_FOR_DIAGNOSTIC_USE
from workers.dicom_reader import SourceFrame
from workers.overlay_render import render_overlay
from workers.sr_writer import ReportContext, patient_study_header

SERIES_DESCRIPTION = "BreastAI heat-map overlay (advisory)"
# PS3.3 C.8.6.1 Conversion Type: WSD = workstation, the closest term for an
# image rendered by software rather than captured from a device.
_CONVERSION_WORKSTATION = "WSD"


def build_overlay_image(
    frame: SourceFrame,
    analysis: ImageAnalysis,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    context: ReportContext,
    series_number: int = 9902,
    series_description: str = SERIES_DESCRIPTION,
    header: Dataset | None = None,
) -> hd.sc.SCImage:
    """Build the RGB Secondary Capture overlay of one analysed frame.

    Parameters
    ----------
    frame
        The analysed source frame (whole frame pixels and scan region).
    analysis
        Findings on the frame's scan-region crop.
    series_instance_uid, sop_instance_uid, instance_number
        Identity of the overlay (derived by the caller for idempotence).
    context
        Equipment identity (manufacturer, model, software version).
    series_number, series_description
        Series Number and Description of the overlay series (one series per model family).
    header
        ``patient_study_header(frame.dataset)``
        (:func:`workers.sr_writer.patient_study_header`), where the caller
        builds several overlays of one frame (one per family) and repairs
        the header once for all; only read here. Made here when not given.

    Returns
    -------
    highdicom.sc.SCImage
        Secondary Capture Image Storage, RGB 8 bit, Explicit VR Little
        Endian, same patient and study as ``frame``.
    """
    pixels = render_overlay(frame.pixels, analysis, frame.scan_region_xywh[:2])
    source = frame.dataset
    if header is None:
        header = patient_study_header(source)
    # The constructor with what SCImage.from_ref_dataset would read from the header (highdicom 0.28), not that
    # method: it first scans the DICOM standard's IOD tables (about 3 ms) to see whether the header describes an
    # image whose acquisition equipment it could list as Contributing Equipment, and then finds no Manufacturer in
    # a patient/study header and lists nothing. Same object, without the scan.
    image = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=context.manufacturer,
        patient_id=header.PatientID,
        patient_name=header.PatientName,
        patient_birth_date=header.PatientBirthDate,
        patient_sex=header.PatientSex,
        accession_number=header.AccessionNumber,
        study_id=header.StudyID,
        study_date=header.StudyDate,
        study_time=header.StudyTime,
        referring_physician_name=header.ReferringPhysicianName,
        # highdicom insists on an orientation for PATIENT; the real value
        # (usually empty for ultrasound) replaces it below.
        patient_orientation=("A", "R"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        specific_character_set=header.get("SpecificCharacterSet"),
    )
    # Type 2 in the SC Image module: two values, or present and empty.
    setattr(image, "PatientOrientation", _patient_orientation(source))
    image.ConversionType = _CONVERSION_WORKSTATION
    image.ManufacturerModelName = context.manufacturer_model_name
    image.SoftwareVersions = context.software_versions
    if context.institution_name:
        image.InstitutionName = context.institution_name
    image.SeriesDescription = series_description[:64]
    image.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    image.BurnedInAnnotation = "YES"
    image.RecognizableVisualFeatures = "NO"
    image.LossyImageCompression = "01" if str(source.get("LossyImageCompression", "00")) == "01" else "00"
    for keyword in ("StudyDescription", "PatientAge"):
        if keyword in header:
            # A copy: the header may be shared by the frame's other overlays, and an element belongs to one data set.
            image[keyword] = copy.deepcopy(header[keyword])
    side = _laterality(source)
    if side:
        image.ImageLaterality = side
    else:
        # Breast is a paired part: with no Image Laterality, General Series
        # Laterality is required (Type 2C) and, being unknown, empty.
        image.Laterality = ""

    text = overlay_description(analysis)
    image.ImageComments = text[:10240]
    image.DerivationDescription = text[:1024]
    image.SourceImageSequence = [_source_reference(frame)]
    return image


def overlay_description(analysis: ImageAnalysis) -> str:
    """Human-readable provenance for Image Comments and Derivation Description."""
    models = sorted(
        {(analysis.segmenter.name, analysis.segmenter.version), (analysis.classifier.name, analysis.classifier.version)}
    )
    model_text = ", ".join(f"{name} {version}" for name, version in models)
    findings = (
        "; ".join(
            f"Lesion {number}: {analysis.score_label} p={lesion.malignancy_probability:.2f}"
            for number, lesion in enumerate(analysis.lesions, start=1)
        )
        or "No lesion detected"
    )
    return f"{NOT_FOR_DIAGNOSTIC_USE}. Heat map of class-activation maps. Models: {model_text}. {findings}."


def _laterality(source: Dataset) -> str:
    """The source image's laterality (Image Laterality, else series Laterality), or ""."""
    for keyword in ("ImageLaterality", "Laterality"):
        side = str(source.get(keyword) or "").strip().upper()
        if side in ("L", "R", "B", "U"):
            return side
    return ""


def _patient_orientation(source: Dataset) -> list[str] | str:
    """The source's Patient Orientation when it has two values, else empty (Type 2)."""
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        return [str(v) for v in value]
    return ""


def _source_reference(frame: SourceFrame) -> Dataset:
    """Source Image Sequence item (PS3.3 C.7.6.1.1.4) for the analysed frame."""
    item = Dataset()
    item.ReferencedSOPClassUID = frame.sop_class_uid
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if frame.frame_number is not None:
        item.ReferencedFrameNumber = frame.frame_number
    purpose = Dataset()
    # (121322, DCM, "Source image for image processing operation"), CID 7202.
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item
