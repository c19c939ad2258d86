"""Which analysis, if any, fits each instance: the one place the service decides it.

:func:`route` reads an instance's header and names a pipeline, or ``None``
with a short sentence a radiologist reads in the report's list of instances
not analysed. Where the header cannot tell (an ultrasound image stored in a
colour encoding without any colour flag), the route asks for a look at the
pixels (``Route.check_colour``) and :func:`check_pixels` makes it, on the very
frames the reader took (:func:`colour_fraction` is the pure measure).

========================================================  ==========  =============================================
What                                                      Pipeline    Why
========================================================  ==========  =============================================
our own SR / overlay / SEG (Manufacturer is ours)         None        :data:`OWN_RESULT_REASON`
Secondary Capture, SR, SEG, presentation state, PDF...    None        :data:`DERIVED_REASON`
US with a colour / Doppler / elastography header signal   None        :data:`COLOUR_REASON`
US (single frame), grey, or colour-encoded and grey       us-bmode    2D B-mode (colour encoding: pixel check)
US cine (multi-frame, not from an ABVS)                   us-bmode    ``frames_note`` says which frames
Enhanced US Volume; US multi-frame from an ABVS/ABUS      abvs
MG For Presentation; DX For Presentation with MG          mg          ``laterality`` and ``view`` filled
MG / DX / Breast Projection For Processing                None        :data:`FOR_PROCESSING_REASON`
specimen, stereo, spot, magnified, partial, CEM views     None        a reason naming the view
Breast Tomosynthesis / Breast Projection                  None        :data:`TOMOSYNTHESIS_REASON`
... the same marked as a synthesised 2D view              mg
anything else                                             None        no pipeline for modality X / SOP class
========================================================  ==========  =============================================

docs/routing.md has the same table for administrators; tests/unit/test_routing.py
checks every row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import UID

from service.errors import InvalidInstance
from workers.dicom_reader import SourceFrame, _frame_indices  # frames_note names the frames the reader takes
from workers.scan_region import clip_box
from workers.sr_writer import ReportContext

BMODE_PIPELINE = "us-bmode"
MAMMOGRAPHY_PIPELINE = "mg"
ABVS_PIPELINE = "abvs"

# --- SOP classes (PS3.4 B.5) ---------------------------------------------------------------------------------------
US_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
US_MULTIFRAME_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.3.1")
# The retired classes of the 1993 standard: old scanners still write them, the content is the same.
_US_RETIRED = frozenset({UID("1.2.840.10008.5.1.4.1.1.6"), UID("1.2.840.10008.5.1.4.1.1.3")})
ENHANCED_US_VOLUME_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.2")
MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
MG_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.2.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
BREAST_TOMOSYNTHESIS = UID("1.2.840.10008.5.1.4.1.1.13.1.3")
BREAST_PROJECTION_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.13.1.4")
BREAST_PROJECTION_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.13.1.5")
_ULTRASOUND_CLASSES = frozenset(
    {US_IMAGE_STORAGE, US_MULTIFRAME_IMAGE_STORAGE, ENHANCED_US_VOLUME_STORAGE, *_US_RETIRED}
)
_MAMMOGRAPHY_CLASSES = frozenset(
    {
        MG_FOR_PRESENTATION,
        MG_FOR_PROCESSING,
        BREAST_TOMOSYNTHESIS,
        BREAST_PROJECTION_FOR_PRESENTATION,
        BREAST_PROJECTION_FOR_PROCESSING,
    }
)
_DX_CLASSES = frozenset({DX_FOR_PRESENTATION, DX_FOR_PROCESSING})  # mammography only with Modality MG
_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
# Objects made from images, not acquired: Secondary Capture (7, 7.x), presentation states (11.x), Parametric Map
# (30), registrations / fiducials / segmentations / surfaces (66.x), Real World Value Mapping (67), every SR
# (88.x: reports, CAD SR, Key Object Selection), encapsulated documents (104.x: PDF, CDA, STL...).
_DERIVED_CLASS_ROOTS = ("7", "11", "30", "66", "67", "88", "104")
_DERIVED_CLASS_EXCEPTIONS = frozenset({UID("1.2.840.10008.5.1.4.1.1.66")})  # Raw Data: acquired, just not an image

# --- reasons (each is read by a radiologist in the report) ---------------------------------------------------------
OWN_RESULT_REASON = "our own result (BreastAI), not an acquired image"
DERIVED_REASON = "a derived object, not an acquired image"
COLOUR_REASON = "colour Doppler/elastography ultrasound: not analysed by the B-mode models"
FOR_PROCESSING_REASON = "mammography For Processing (raw detector data): only For Presentation images are analysed"
TOMOSYNTHESIS_REASON = "tomosynthesis: analysed only through a synthesised 2D view"
SPECIMEN_REASON = "specimen radiograph: only views of the breast are analysed"
STEREOTACTIC_REASON = "stereotactic biopsy image: only full-field mammograms are analysed"
SPOT_COMPRESSION_REASON = "spot compression view: only full-field mammograms are analysed"
MAGNIFICATION_REASON = "magnification view: only full-field mammograms are analysed"
PARTIAL_VIEW_REASON = "partial view of a breast larger than the detector: only whole-breast views are analysed"
CONTRAST_MAMMOGRAPHY_REASON = (
    "contrast-enhanced mammography (high-energy or recombined image): only standard mammograms are analysed"
)

# --- ultrasound: colour, Doppler and elastography in the header -----------------------------------------------------
# Ultrasound Color Data Present (0028,0014), US Image Module (PS3.3 C.8.5.6): 1 = colour data present in the image.
_COLOUR_DATA_PRESENT = 1
# Image Type value 4 of US images is a hexadecimal bitmap of the modes in the image (PS3.3 C.8.5.6.1.1): 0001 2D,
# 0002 M-Mode, 0004 CW Doppler, 0008 PW Doppler, 0010 Color Doppler, 0020 Color M-Mode, 0040 3D Rendering,
# 0100 Color Power Mode, 0200 Tissue Characterization, 0400 Spatially-related frames. Any Doppler, colour or
# tissue-characterisation (elastography) bit means the pixels are not a plain B-mode image.
_US_MODE_BITMAP = re.compile(r"^[0-9A-Fa-f]{4}$")
_COLOUR_MODE_BITS = 0x0004 | 0x0008 | 0x0010 | 0x0020 | 0x0100 | 0x0200
# Free-text Image Type values vendors write for these modes. Parts of a value (COLOR FLOW, POWER_DOPPLER,
# ELASTOGRAPHY, SHEAR WAVE, STRAIN) and whole values that are the modes' usual abbreviations: CFM / CFI (colour flow
# mapping / imaging), CPA (colour power angio), PDI (power Doppler imaging), SWE (shear-wave elastography), SMI
# (superb micro-vascular imaging), ADF (advanced dynamic flow).
_COLOUR_WORDS = ("COLOR", "COLOUR", "DOPPLER", "ELASTO", "STRAIN", "SHEAR")
_COLOUR_ABBREVIATIONS = frozenset({"CFM", "CFI", "CPA", "PDI", "SWE", "SMI", "ADF"})
# Sequence of Ultrasound Regions (PS3.3 C.8.5.5): Region Data Type (C.8.5.5.1.2) 0002 Color Flow, 0003 PW Spectral
# Doppler, 0004 CW Spectral Doppler, 0005-0007 Doppler Mean / Mode / Max Trace; Region Spatial Format
# (C.8.5.5.1.1) 0003 Spectral (CW or PW Doppler). A Color Bar region (000E) alone is left to the pixel check.
_DOPPLER_REGION_DATA_TYPES = frozenset({0x0002, 0x0003, 0x0004, 0x0005, 0x0006, 0x0007})
_SPECTRAL_SPATIAL_FORMAT = 0x0003
# Photometric interpretations that can carry colour (PS3.3 C.7.6.3.1.2): such images get the pixel check.
_COLOUR_ENCODINGS = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}
)

# --- ultrasound: the pixel check ------------------------------------------------------------------------------------
# A pixel is saturated colour when its three samples spread by at least _COLOUR_CHROMA (of 255) and that spread is at
# least _COLOUR_SATURATION of its brightest sample (HSV saturation). Doppler and elastography maps are fully saturated
# reds, blues, yellows and greens (saturation near 1); grey B-mode, even JPEG-compressed, spreads by a few levels;
# tinted B-mode maps (sepia, blue) reach a large spread only when bright, at a saturation of about 0.3 or less.
_COLOUR_CHROMA = 64
_COLOUR_SATURATION = 0.5
# Blobs narrower than 3 pixels are dropped (a 3 x 3 opening): annotation text, caliper crosses and dotted lines are
# 1-2 pixels thick and are drawn in colour on grey scans; flow signal comes in patches.
_COLOUR_OPENING = np.ones((3, 3), np.uint8)
# Share of the scan region in saturated colour above which an image is colour Doppler / elastography. On the vendor
# files pydicom ships, grey scans with coloured annotations inside the region measure at most 0.2 % (an ALOKA
# green cursor and label, Philips blue depth ticks) and colour or power Doppler at least 7.8 %. 0.5 % sits well
# above the annotations and still flags a Doppler box with only a few vessels (a 20 x 20 pixel flow patch is
# about 0.5 % of a 300 x 270 scan region): B-mode models must not see flow painted in as grey.
COLOUR_FRACTION_THRESHOLD = 0.005

# --- ultrasound: automated breast volume scanners --------------------------------------------------------------------
# Automated breast ultrasound systems, whose multi-frame output is a volume sweep (one frame per slice), not a
# cine loop: Siemens ACUSON S2000 ABVS (Automated Breast Volume Scanner), GE Invenia ABUS (Automated Breast
# Ultrasound System) and its predecessor, U-Systems somo-v / somo•v. Matched as words in Manufacturer's Model Name,
# Series Description, Protocol Name or Image Type (an S2000 may name its ABVS in the model name or only in the
# series), or by the manufacturer U-Systems, which made no other scanner.
ABVS_MARKERS = re.compile(r"\bABVS\b|\bABUS\b|\bSOMO\s*[-•·.]?\s*V\b|AUTOMATED BREAST", re.IGNORECASE)
ABVS_MANUFACTURERS = frozenset({"U-SYSTEMS", "U-SYSTEMS, INC.", "U-SYSTEMS INC"})
# How many frames of a cine are analysed: the reader's default (read_frames max_frames), the middle frame.
CINE_MAX_FRAMES = 1

# --- mammography ------------------------------------------------------------------------------------------------------
# View Position (0018,5101) of mammograms takes the ACR MQCM abbreviations of CID 4014 (PS3.3 C.8.11.7, PS3.16).
MAMMOGRAPHY_VIEWS = frozenset({"CC", "MLO", "ML", "LM", "LMO", "FB", "SIO", "ISO", "XCCL", "XCCM"})
# View Code Sequence (0054,0220), CID 4014 "View for Mammography" (PS3.16): SNOMED CT codes, and the SNOMED RT
# codes (scheme SRT) older equipment still writes, to the ACR abbreviation.
_VIEW_CODES = {
    "399260004": "ML",
    "R-10224": "ML",
    "399368009": "MLO",
    "R-10226": "MLO",
    "399352003": "LM",
    "R-10228": "LM",
    "399099002": "LMO",
    "R-10230": "LMO",
    "399162004": "CC",
    "R-10242": "CC",
    "399196006": "FB",
    "R-10244": "FB",
    "399188001": "SIO",
    "R-102D0": "SIO",
    "441555000": "ISO",
    "R-40AAA": "ISO",
    "399192008": "XCCL",
    "R-1024A": "XCCL",
    "399101009": "XCCM",
    "R-1024B": "XCCM",
}
# CID 4014 "tissue specimen from breast".
_SPECIMEN_VIEW_CODES = frozenset({"127457009", "G-8310"})
# View Modifier Code Sequence (0054,0222), CID 4015 "View Modifier for Mammography": Spot Compression, Magnification.
_SPOT_COMPRESSION_CODES = frozenset({"399055006", "R-102D7"})
_MAGNIFICATION_CODES = frozenset({"399163009", "R-102D6"})
# Image Type values of contrast-enhanced mammography other than its low-energy image (a standard mammogram).
_CONTRAST_MAMMOGRAPHY_TYPES = frozenset({"HIGH_ENERGY", "RECOMBINED", "SUBTRACTION", "SUBTRACTED"})
# A 2D image synthesised from a tomosynthesis acquisition, stored in a tomosynthesis SOP class. Image Type value 4
# (Derived Pixel Contrast, PS3.3 C.8.16.1) GENERATED_2D is how Hologic marks C-View / Intelligent 2D images
# (DERIVED\PRIMARY\TOMOSYNTHESIS\GENERATED_2D); SYNTHESIZED / SYNTHETIC cover vendors that name it plainly. The
# products' names in Series Description are the fallback: Hologic C-View and Intelligent 2D, GE V-Preview, Siemens
# Insight 2D, Fujifilm S-View. Only a single-frame object qualifies: a volume is never one image.
_SYNTHESISED_2D_TYPES = frozenset({"GENERATED_2D", "SYNTHESIZED", "SYNTHESISED", "SYNTHETIC"})
_SYNTHESISED_2D_NAMES = re.compile(
    r"\b(C-VIEW|INTELLIGENT 2D|V-PREVIEW|INSIGHT 2D|S-VIEW|SYNTHE[SZ]I[SZ]ED 2D|SYNTHETIC 2D)\b", re.IGNORECASE
)
_LATERALITIES = frozenset({"L", "R", "B"})
_SIDE_WORDS = {"left": "L", "right": "R"}

# Our results carry this Manufacturer (General Equipment, PS3.3 C.7.5.1), whatever the installation: the SR, the
# overlays and the segmentations all take it from ReportContext, which no setting changes.
_OUR_MANUFACTURER = ReportContext.manufacturer


@dataclass(frozen=True)
class Route:
    """The pipeline chosen for an instance, or the reason none was.

    Attributes
    ----------
    pipeline
        :data:`BMODE_PIPELINE`, :data:`MAMMOGRAPHY_PIPELINE`, :data:`ABVS_PIPELINE`, or ``None``.
    reason
        A short sentence: what the instance is, or why it is not analysed (shown in the report).
    laterality
        Mammograms: "L", "R" or "B" when the header says, else ``None``.
    view
        Mammograms: the ACR abbreviation of the view (CC, MLO, ML, LM, XCCL...) when the header says, else ``None``.
    frames_note
        Ultrasound cines: how many frames there are and which are analysed.
    max_frames
        How many frames the reader takes (``read_frames(max_frames=...)``); :attr:`frames_note` describes them.
    check_colour
        The image is in a colour encoding and its header has no colour flag: run :func:`check_pixels` on the
        frames read before a B-mode model sees them.
    """

    pipeline: str | None
    reason: str
    laterality: str | None = None
    view: str | None = None
    frames_note: str | None = None
    max_frames: int = 1
    check_colour: bool = False


def route(header: Dataset) -> Route:
    """Choose the pipeline for one instance from its header.

    Parameters
    ----------
    header
        The instance's data set; pixel data is neither needed nor read.

    Returns
    -------
    Route
        Decided from SOP Class UID and Modality (SOP Common and General Series modules, PS3.3 C.12.1, C.7.3.1) and
        the attributes named in the module's comments. ``check_colour`` is set where only the pixels can tell.
    """
    sop_class = UID(_text(header, "SOPClassUID"))
    modality = _text(header, "Modality").upper()
    if _text(header, "Manufacturer").casefold() == _OUR_MANUFACTURER.casefold():
        return Route(None, OWN_RESULT_REASON)
    if _is_derived_class(sop_class):
        return Route(None, DERIVED_REASON)
    if sop_class in _ULTRASOUND_CLASSES:
        return _route_ultrasound(header, sop_class)
    if sop_class in _MAMMOGRAPHY_CLASSES or (sop_class in _DX_CLASSES and modality == "MG"):
        return _route_mammography(header, sop_class)
    name = sop_class.name or str(sop_class) or "no SOP Class UID"
    return Route(None, f"no pipeline for modality {modality or 'unknown'} / {name}")


def colour_fraction(rgb: npt.NDArray[np.uint8], region: tuple[int, int, int, int]) -> float:
    """Share of a region's pixels in saturated colour, counting patches only.

    Parameters
    ----------
    rgb
        One frame, uint8 (rows, columns, 3) in RGB.
    region
        (x, y, width, height) of the scan region in frame pixels, clipped to the frame (the whole frame if nothing
        of it is inside). Colour outside it (colour bars, legends, logos) is not counted.

    Returns
    -------
    float
        In [0, 1]: pixels whose samples spread by at least 64 levels at an HSV saturation of at least 0.5, after a
        3 x 3 opening that removes strokes narrower than 3 pixels (text, calipers), over the region's area.

    Raises
    ------
    ValueError
        If ``rgb`` is not a non-empty uint8 (rows, columns, 3) array.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"colour_fraction needs a uint8 (rows, columns, 3) array, got {rgb.dtype} {rgb.shape}")
    rows, columns = int(rgb.shape[0]), int(rgb.shape[1])
    x, y, w, h = clip_box(region, rows, columns)
    samples = rgb[y : y + h, x : x + w].astype(np.int16)
    brightest = samples.max(axis=-1)
    spread = brightest - samples.min(axis=-1)
    saturated = (spread >= _COLOUR_CHROMA) & (spread >= _COLOUR_SATURATION * brightest)
    patches = cv2.morphologyEx(saturated.astype(np.uint8), cv2.MORPH_OPEN, _COLOUR_OPENING)
    return float(np.count_nonzero(patches)) / float(w * h)


def confirm_grey(chosen: Route, frames: Iterable[tuple[npt.NDArray[np.uint8], tuple[int, int, int, int]]]) -> Route:
    """Settle a route that asked for the pixel check, from the frames' RGB pixels and scan regions.

    Parameters
    ----------
    chosen
        What :func:`route` said; returned unchanged unless ``chosen.check_colour``.
    frames
        (RGB frame, scan region) of every frame that would be analysed.

    Returns
    -------
    Route
        ``None`` with :data:`COLOUR_REASON` if any frame's :func:`colour_fraction` reaches
        :data:`COLOUR_FRACTION_THRESHOLD`, else ``chosen`` with the check done.
    """
    if not chosen.check_colour:
        return chosen
    for rgb, region in frames:
        if colour_fraction(rgb, region) >= COLOUR_FRACTION_THRESHOLD:
            return Route(None, COLOUR_REASON)
    return replace(chosen, check_colour=False)


def check_pixels(chosen: Route, path: Path, frames: Sequence[SourceFrame]) -> Route:
    """The pixel check on the frames the reader took from ``path``, for a route that asks for it.

    Decodes those frames again in colour (``read_frames`` keeps only their grey levels) and calls
    :func:`confirm_grey` with their scan regions. Routes without ``check_colour`` are returned at once.

    Raises
    ------
    InvalidInstance
        If a frame does not decode in colour (the reader decoded it, so this means a changed or odd file).
    """
    if not chosen.check_colour:
        return chosen
    return confirm_grey(chosen, ((_rgb_frame(path, frame), frame.scan_region_xywh) for frame in frames))


def _route_ultrasound(header: Dataset, sop_class: UID) -> Route:
    """US Image, US Multi-frame and Enhanced US Volume: colour first, then volume scanners, then B-mode."""
    if _has_colour_signal(header):
        return Route(None, COLOUR_REASON)
    frames = _frame_count(header)
    if sop_class == ENHANCED_US_VOLUME_STORAGE:
        return Route(ABVS_PIPELINE, "automated breast ultrasound (ABVS) volume")
    if frames > 1 and _is_abvs_device(header):
        return Route(ABVS_PIPELINE, "automated breast ultrasound (ABVS) volume")
    check = _text(header, "PhotometricInterpretation").upper() in _COLOUR_ENCODINGS
    if frames > 1:
        note = cine_note(frames, CINE_MAX_FRAMES)
        return Route(
            BMODE_PIPELINE,
            f"B-mode ultrasound {note}",
            frames_note=note,
            max_frames=CINE_MAX_FRAMES,
            check_colour=check,
        )
    return Route(BMODE_PIPELINE, "2D B-mode ultrasound image", check_colour=check)


def cine_note(frame_count: int, max_frames: int) -> str:
    """Which frames of a cine are analysed, in words, 1-based as the report numbers them.

    The frames are those the reader takes with ``read_frames(max_frames=max_frames)``: the middle one for 1,
    else that many evenly spaced, first and last included.
    """
    numbers = [index + 1 for index in _frame_indices(frame_count, max_frames)]
    if len(numbers) == 1:
        return f"cine of {frame_count} frames: frame {numbers[0]} analysed (the middle one)"
    listed = ", ".join(str(number) for number in numbers)
    return f"cine of {frame_count} frames: frames {listed} analysed (evenly spaced)"


def _has_colour_signal(header: Dataset) -> bool:
    """Any header attribute saying the image holds colour flow, Doppler or elastography."""
    if _int(header.get("UltrasoundColorDataPresent")) == _COLOUR_DATA_PRESENT:
        return True
    values = _image_type(header)
    if len(values) >= 4 and _US_MODE_BITMAP.match(values[3]) and int(values[3], 16) & _COLOUR_MODE_BITS:
        return True
    for value in values:
        if value in _COLOUR_ABBREVIATIONS or any(word in value for word in _COLOUR_WORDS):
            return True
    for region in header.get("SequenceOfUltrasoundRegions") or ():
        if _int(region.get("RegionDataType")) in _DOPPLER_REGION_DATA_TYPES:
            return True
        if _int(region.get("RegionSpatialFormat")) == _SPECTRAL_SPATIAL_FORMAT:
            return True
    return False


def _is_abvs_device(header: Dataset) -> bool:
    """An automated breast scanner made this object (:data:`ABVS_MARKERS`, :data:`ABVS_MANUFACTURERS`)."""
    if _text(header, "Manufacturer").upper() in ABVS_MANUFACTURERS:
        return True
    texts = [_text(header, k) for k in ("ManufacturerModelName", "SeriesDescription", "ProtocolName")]
    return any(ABVS_MARKERS.search(text) for text in [*texts, *_image_type(header)])


def _route_mammography(header: Dataset, sop_class: UID) -> Route:
    """Mammography SOP classes (and DX with Modality MG): For Presentation full-field views only."""
    if sop_class in (MG_FOR_PROCESSING, DX_FOR_PROCESSING, BREAST_PROJECTION_FOR_PROCESSING) or (
        _text(header, "PresentationIntentType").upper() == "FOR PROCESSING"
    ):
        return Route(None, FOR_PROCESSING_REASON)
    synthesised = _is_synthesised_2d(header)
    if sop_class in (BREAST_TOMOSYNTHESIS, BREAST_PROJECTION_FOR_PRESENTATION) and not synthesised:
        return Route(None, TOMOSYNTHESIS_REASON)
    special = _special_view_reason(header)
    if special is not None:
        return Route(None, special)
    laterality = mammography_laterality(header)
    view = mammography_view(header)
    what = "synthesised 2D mammogram" if synthesised else "mammogram"
    side = {"L": "left", "R": "right", "B": "both breasts"}.get(laterality or "", "side not stated")
    return Route(MAMMOGRAPHY_PIPELINE, f"{what}, {side}, {view or 'view not stated'}", laterality=laterality, view=view)


def _special_view_reason(header: Dataset) -> str | None:
    """Why a mammography image is not a full-field view of the breast, if it is not."""
    values = _image_type(header)
    codes = _view_codes(header)
    if codes & _SPECIMEN_VIEW_CODES or "SPECIMEN" in values or _text(header, "ViewPosition").upper() == "SPECIMEN":
        return SPECIMEN_REASON
    if any("STEREO" in value for value in values):
        return STEREOTACTIC_REASON
    modifiers = _view_modifier_codes(header)
    if modifiers & _SPOT_COMPRESSION_CODES:
        return SPOT_COMPRESSION_REASON
    if modifiers & _MAGNIFICATION_CODES:
        return MAGNIFICATION_REASON
    # Partial View (0028,1350), Mammography Image Module (PS3.3 C.8.11.7): YES when the image shows a part of a
    # breast larger than the detector (one tile of a mosaic).
    if _text(header, "PartialView").upper() == "YES":
        return PARTIAL_VIEW_REASON
    if _CONTRAST_MAMMOGRAPHY_TYPES.intersection(values):
        return CONTRAST_MAMMOGRAPHY_REASON
    return None


def _is_synthesised_2d(header: Dataset) -> bool:
    """A single-frame image the header marks as synthesised from tomosynthesis (:data:`_SYNTHESISED_2D_TYPES`)."""
    if _frame_count(header) > 1:
        return False
    if _SYNTHESISED_2D_TYPES.intersection(_image_type(header)):
        return True
    return bool(_SYNTHESISED_2D_NAMES.search(_text(header, "SeriesDescription")))


def mammography_laterality(header: Dataset) -> str | None:
    """Which breast a mammography image shows: "L", "R", "B", or ``None`` when the header does not say.

    Image Laterality (0020,0062, Mammography Image Module C.8.11.7), else the series' Laterality (0020,0060), else
    Frame Laterality (0020,9072) of the Frame Anatomy functional group (tomosynthesis and Breast Projection
    objects, C.7.6.16.2.8), else a side in the view's code meaning ("left cranio-caudal") or a View Position
    written with the side ("LCC").
    """
    candidates = [_text(header, "ImageLaterality"), _text(header, "Laterality")]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = header.get(group) or ()
        if items:
            anatomy = items[0].get("FrameAnatomySequence") or ()
            if anatomy:
                candidates.append(_text(anatomy[0], "FrameLaterality"))
    for candidate in candidates:
        if candidate.upper() in _LATERALITIES:
            return candidate.upper()
    for item in header.get("ViewCodeSequence") or ():
        meaning = _text(item, "CodeMeaning").lower()
        for word, side in _SIDE_WORDS.items():
            if meaning.startswith(word):
                return side
    position = _text(header, "ViewPosition").upper()
    if position not in MAMMOGRAPHY_VIEWS and position[:1] in ("L", "R") and position[1:] in MAMMOGRAPHY_VIEWS:
        return position[0]
    return None


def mammography_view(header: Dataset) -> str | None:
    """The view of a mammography image as its ACR abbreviation (CC, MLO, ML, LM, XCCL...), or ``None``.

    View Position (0018,5101) when it holds one of :data:`MAMMOGRAPHY_VIEWS` (also written after the side,
    "RMLO"), else the first code of the View Code Sequence (0054,0220) found in CID 4014.
    """
    position = _text(header, "ViewPosition").upper()
    if position in MAMMOGRAPHY_VIEWS:
        return position
    if position[:1] in ("L", "R") and position[1:] in MAMMOGRAPHY_VIEWS:
        return position[1:]
    for item in header.get("ViewCodeSequence") or ():
        view = _VIEW_CODES.get(_text(item, "CodeValue").upper())
        if view is not None:
            return view
    return None


def _view_codes(header: Dataset) -> set[str]:
    """Code values of the View Code Sequence."""
    return {_text(item, "CodeValue").upper() for item in header.get("ViewCodeSequence") or ()}


def _view_modifier_codes(header: Dataset) -> set[str]:
    """Code values of the View Modifier Code Sequence, nested in the view item (C.8.11.7) or, as some write it, not."""
    sequences = [header.get("ViewModifierCodeSequence") or ()]
    sequences += [item.get("ViewModifierCodeSequence") or () for item in header.get("ViewCodeSequence") or ()]
    return {_text(item, "CodeValue").upper() for sequence in sequences for item in sequence}


def _is_derived_class(sop_class: UID) -> bool:
    """A SOP class of objects derived from images (:data:`_DERIVED_CLASS_ROOTS`)."""
    if sop_class in _DERIVED_CLASS_EXCEPTIONS or not sop_class.startswith(_STORAGE_ROOT):
        return False
    first = sop_class[len(_STORAGE_ROOT) :].split(".", 1)[0]
    return first in _DERIVED_CLASS_ROOTS


def _rgb_frame(path: Path, frame: SourceFrame) -> npt.NDArray[np.uint8]:
    """One frame of ``path`` as uint8 RGB: YBR comes out of pydicom as RGB, PALETTE COLOR through its table."""
    header = frame.dataset
    # read_frames decodes one frame of an object with a Multi-frame module, the whole pixel data of others.
    index = None if "NumberOfFrames" not in header else (frame.frame_number or 1) - 1
    try:
        array = pixel_array(path, index=index)
        if _text(header, "PhotometricInterpretation").upper() == "PALETTE COLOR":
            array = apply_color_lut(array, header)
    except Exception as exc:
        raise InvalidInstance(f"{path.name}: frame does not decode in colour: {type(exc).__name__}: {exc}") from exc
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InvalidInstance(f"{path.name}: colour frame has shape {array.shape}, expected (rows, columns, 3)")
    if array.dtype == np.uint8:
        return np.asarray(array, dtype=np.uint8)
    if array.dtype == np.uint16:  # 16-bit samples or lookup-table entries: the top byte
        return (np.asarray(array, dtype=np.uint16) >> 8).astype(np.uint8)
    values = np.asarray(array, dtype=np.float64)
    high = float(values.max()) if values.size else 0.0
    scaled = values * (255.0 / high) if high > 0 else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _frame_count(header: Dataset) -> int:
    """Number of Frames (PS3.3 C.7.6.6); absent or malformed means one."""
    count = _int(header.get("NumberOfFrames"))
    return count if count is not None and count > 1 else 1


def _image_type(header: Dataset) -> list[str]:
    """Image Type (0008,0008) values, upper case, without padding; one value when it is single-valued."""
    value = header.get("ImageType")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(item).strip().upper() for item in values]


def _text(header: Dataset, keyword: str) -> str:
    """A single-valued string attribute, stripped; empty when absent."""
    value = header.get(keyword)
    return "" if value is None else str(value).strip()


def _int(value: object) -> int | None:
    """An integer attribute value (US, IS, or the first of several), or ``None``."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None
