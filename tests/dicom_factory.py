"""Builders of synthetic but valid Ultrasound DICOM instances for tests.

Every dataset is US Image Storage (or US Multi-frame Image Storage for a
3D array) in Explicit VR Little Endian with a Part 10 file meta header, the
Patient, General Study, General Series, US Region Calibration and US Image
modules filled (PS3.3 A.59), and obviously synthetic names ("ANON^TEST").
"""

from __future__ import annotations

import io
import pathlib
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

if TYPE_CHECKING:
    from models.inference.findings import ImageAnalysis

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
ENHANCED_US_VOLUME_STORAGE = "1.2.840.10008.5.1.4.1.1.6.2"


def make_us_dataset(
    pixels: npt.NDArray[np.uint8],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    spacing_mm: float | None = 0.1,
    photometric: str = "MONOCHROME2",
    patient_age: str | None = "052Y",
) -> Dataset:
    """Build a US image dataset around ``pixels``.

    Parameters
    ----------
    pixels
        uint8 array: (rows, columns) grayscale, (rows, columns, 3) RGB, or
        (frames, rows, columns) grayscale for a multi-frame object.
    study_uid, series_uid, sop_uid
        UIDs; fresh random ones when ``None``.
    spacing_mm
        Isotropic pixel size written into one 2D ultrasound region covering
        the whole frame (in cm, as PS3.3 C.8.5.5 requires); ``None`` writes
        no region at all.
    photometric
        "MONOCHROME2", "MONOCHROME1" (pixels are stored as given) or "RGB"
        (a 2D array is replicated into three equal channels).
    patient_age
        Patient's Age (AS), or ``None`` to leave it out.

    Returns
    -------
    pydicom.Dataset
        With ``file_meta`` set, ready for :func:`write_dataset`.
    """
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {array.dtype}")
    if photometric == "RGB" and array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    multi_frame = photometric != "RGB" and array.ndim == 3
    if photometric == "RGB" and array.ndim != 3:
        raise ValueError(f"RGB needs a (rows, columns, 3) array, got {array.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        raise ValueError(f"unsupported photometric interpretation {photometric!r}")
    rows, columns = (array.shape[1], array.shape[2]) if multi_frame else (array.shape[0], array.shape[1])

    sop_class = US_MULTIFRAME_IMAGE_STORAGE if multi_frame else US_IMAGE_STORAGE
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    # Value 3 is the anatomic region, value 4 the mode bitmap (0001 = 2D), PS3.3 C.8.5.6.1.1.
    ds.ImageType = ["ORIGINAL", "PRIMARY", "BREAST", "0001"]
    ds.StudyDate = "20240101"
    ds.SeriesDate = "20240101"
    ds.ContentDate = "20240101"
    ds.StudyTime = "120000"
    ds.SeriesTime = "120000"
    ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "US"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "US BREAST (synthetic test)"
    ds.SeriesDescription = "B-mode"
    ds.PatientName = "ANON^TEST"
    ds.PatientID = "TEST0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    if patient_age is not None:
        ds.PatientAge = patient_age
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ImageLaterality = "L"

    if spacing_mm is not None:
        region = Dataset()
        region.RegionSpatialFormat = 1  # 2D
        region.RegionDataType = 1  # tissue
        region.RegionFlags = 0
        region.RegionLocationMinX0 = 0
        region.RegionLocationMinY0 = 0
        region.RegionLocationMaxX1 = columns - 1
        region.RegionLocationMaxY1 = rows - 1
        region.PhysicalUnitsXDirection = 3  # cm
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = spacing_mm / 10.0
        region.PhysicalDeltaY = spacing_mm / 10.0
        ds.SequenceOfUltrasoundRegions = [region]

    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if multi_frame:
        ds.NumberOfFrames = array.shape[0]
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = 50.0
    ds.PixelData = np.ascontiguousarray(array).tobytes()
    return ds


MG_FOR_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"


def make_mg_dataset(
    pixels: npt.NDArray[np.uint16],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    laterality: str = "L",
    view: str = "CC",
    imager_spacing_mm: float = 0.1,
) -> Dataset:
    """Build a Digital Mammography X-Ray Image - For Presentation dataset around ``pixels``.

    The modules of PS3.3 A.26.2 are filled (Mammography Series and Image,
    DX Anatomy Imaged, DX Image, DX Detector with Imager Pixel Spacing, DX
    Positioning, VOI LUT), 16-bit MONOCHROME2, with no Pixel Spacing and no
    patient-space position or orientation: a 2D projection.

    Parameters
    ----------
    pixels
        uint16 array (rows, columns), values within 12 bits stored.
    study_uid, series_uid, sop_uid, frame_of_reference_uid
        UIDs; fresh random ones when ``None`` (the Frame of Reference too).
    laterality, view
        Image Laterality (L or R) and View Position (CC, MLO...).
    imager_spacing_mm
        Isotropic Imager Pixel Spacing (at the detector plane).
    """
    array = np.asarray(pixels)
    if array.dtype != np.uint16 or array.ndim != 2:
        raise ValueError(f"pixels must be a 2D uint16 array, got {array.dtype} {array.shape}")
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MG_FOR_PRESENTATION_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    for keyword in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
        setattr(ds, keyword, "20240101")
    for keyword in ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime"):
        setattr(ds, keyword, "120000")
    ds.AccessionNumber = "ACC0002"
    ds.Modality = "MG"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MG BREAST (synthetic test)"
    ds.SeriesDescription = f"{laterality} {view}"
    ds.PatientName = "ANON^TEST"
    ds.PatientID = "TEST0002"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.PatientAge = "055Y"
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["P", "L"] if laterality == "R" else ["A", "R"]
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    breast = Dataset()
    breast.CodeValue = "76752008"
    breast.CodingSchemeDesignator = "SCT"
    breast.CodeMeaning = "Breast"
    ds.AnatomicRegionSequence = [breast]
    view_code = Dataset()
    view_code.CodeValue = "399162004" if view == "CC" else "399368009"
    view_code.CodingSchemeDesignator = "SCT"
    view_code.CodeMeaning = "cranio-caudal" if view == "CC" else "medio-lateral oblique"
    view_code.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_code]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.ImagerPixelSpacing = [imager_spacing_mm, imager_spacing_mm]
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DistanceSourceToDetector = 660.0
    ds.DistanceSourceToPatient = 640.0
    ds.EstimatedRadiographicMagnificationFactor = 660.0 / 640.0
    ds.BodyPartThickness = 50.0
    ds.CompressionForce = 100.0
    ds.OrganExposed = "BREAST"
    ds.KVP = 28.0
    ds.Exposure = 100
    ds.ExposureTime = 1000
    ds.ContrastBolusAgent = ""
    ds.AcquisitionContextSequence = []
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = array.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(array).tobytes()
    return ds


def make_us_volume_dataset(
    frames: npt.NDArray[np.uint8],
    *,
    spacing_mm: float = 0.2,
    slice_step_mm: float = 0.5,
    origin_mm: tuple[float, float, float] = (-40.0, 0.0, 25.0),
    study_uid: str | None = None,
) -> Dataset:
    """An Enhanced US Volume (PS3.3 A.59) of transverse frames swept along the patient's head-foot axis.

    The header an automated breast scanner's volume carries for placing its frames: a Frame of Reference and,
    per frame, Plane Position (Patient) one ``slice_step_mm`` further along +Z (superior), with the orientation
    (rows along +X, columns down along +Y: patient's left and posterior) and the Pixel Measures shared
    (C.7.6.16.2). The rest is :func:`make_us_dataset`'s multi-frame US header, enough for the reader; not every
    attribute the Enhanced US Volume IOD requires is present.
    """
    ds = make_us_dataset(frames, study_uid=study_uid, spacing_mm=None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_US_VOLUME_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]
    measures.SliceThickness = slice_step_mm
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for index in range(int(ds.NumberOfFrames)):
        position = Dataset()
        position.ImagePositionPatient = [origin_mm[0], origin_mm[1], origin_mm[2] + index * slice_step_mm]
        item = Dataset()
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds


def write_dataset(ds: Dataset, path: pathlib.Path | str) -> pathlib.Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble and file meta) and return the path."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(target, ds, enforce_file_format=True)
    return target


def encoded_without_run_stamps(ds: Dataset) -> bytes:
    """:func:`encode` of ``ds`` with what differs between two runs of the same build emptied.

    Every date and time (creation stamps) and highdicom's random Dimension Organization UID of a SEG. Through bytes,
    not ``deepcopy``: a highdicom SEG holds an SQLite index that only the thread that built it may copy.
    """
    copied = pydicom.dcmread(io.BytesIO(encode(ds)))

    def blank(_dataset: Dataset, element: pydicom.DataElement) -> None:
        if element.VR in ("DA", "TM", "DT") or element.keyword == "DimensionOrganizationUID":
            element.value = ""

    copied.walk(blank)
    return encode(copied)


def encode(ds: Dataset) -> bytes:
    """``ds`` as the bytes of a DICOM Part 10 file (preamble and file meta), as :func:`write_dataset` writes it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def synthetic_breast_image(rows: int = 240, columns: int = 320, seed: int = 0) -> npt.NDArray[np.uint8]:
    """A speckled B-mode-like image with a dark oval "lesion" in the middle."""
    rng = np.random.default_rng(seed)
    image = rng.normal(110, 25, size=(rows, columns))
    yy, xx = np.mgrid[0:rows, 0:columns]
    lesion = ((xx - columns / 2) / (columns / 8)) ** 2 + ((yy - rows / 2) / (rows / 10)) ** 2 <= 1
    image[lesion] = rng.normal(35, 8, size=int(lesion.sum()))
    return np.clip(image, 0, 255).astype(np.uint8)


def square_lesion_analysis(
    crop_shape: tuple[int, int],
    *,
    lesions: int = 1,
    size: int | None = None,
    probability: float = 0.87,
) -> ImageAnalysis:
    """A fabricated pipeline result: ``lesions`` square lesions on a crop.

    Squares of side ``size`` (default a fifth of the shorter side) sit on
    the crop's diagonal; each has a closed outline, its bounding box, and a
    CAM equal to 1 inside the square and 0 elsewhere.
    """
    from models.inference.findings import ImageAnalysis, Lesion, ModelInfo

    rows, columns = crop_shape
    side = size or max(4, min(rows, columns) // 5)
    found = []
    for index in range(lesions):
        x0 = y0 = min(rows, columns) // 8 + index * (side + 4)
        x0, y0 = min(x0, columns - side - 1), min(y0, rows - side - 1)
        x1, y1 = x0 + side, y0 + side
        outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
        cam = np.zeros((rows, columns), dtype=np.float32)
        cam[y0:y1, x0:x1] = 1.0
        found.append(Lesion(outline, (x0, y0, side, side), side * side, probability, cam))
    return ImageAnalysis(
        lesions=tuple(found),
        segmenter=ModelInfo("breastai-seg-unet", "1.2.0", "a" * 64),
        classifier=ModelInfo("breastai-cls-resnet", "3.4.1", "b" * 64),
        image_shape=(rows, columns),
    )


def dciodvfy_errors(path: pathlib.Path) -> list[str]:
    """Lines of dicom3tools' ``dciodvfy`` output that report an error.

    Callers skip when the binary is missing (``shutil.which("dciodvfy")``).
    """
    import subprocess

    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if "Error" in line]
