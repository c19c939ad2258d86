"""Read DICOM image instances into analysable grayscale frames.

The only place in the workers that touches pixel data of received objects.
Everything a pipeline needs comes out as plain numpy plus geometry:

- the whole frame as uint8 grayscale, whatever the photometric
  interpretation (PS3.3 C.7.6.3.1.2): colour becomes ITU-R BT.601 luma,
  PALETTE COLOR goes through its lookup table (C.7.6.3.1.5-6), MONOCHROME1
  is inverted, deeper data is windowed (C.11.2) or min-max scaled to 0-255;
- the scan region and pixel spacing from the US Region Calibration module
  (C.8.5.5), else Pixel Spacing (C.7.6.2.1.1 / C.8.5.6, or the Pixel Measures
  functional group of an enhanced multi-frame object, C.7.6.16.2.1), else none.

Failures map onto the project's error tree: an object that is not usable
DICOM raises :class:`~service.errors.InvalidInstance`; a valid object we
cannot decode raises :class:`~service.errors.UnsupportedInput` naming the
value, so that the job is dead-lettered with a readable reason.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from service.errors import BreastAIError, ImageTooLarge, InvalidInstance, UnsupportedInput
from service.image_limits import DEFAULT_IMAGE_LIMITS, ImageLimits, over_limits
from workers.frame_geometry import functional_group_value
from workers.scan_region import clip_box, estimate_scan_region, region_from_us_regions

# Photometric interpretations this reader turns into grayscale. YBR_* come
# out of pydicom 3 as RGB (its default ``as_rgb``), J2K's YBR_RCT/ICT are
# undone by the codec, so all colour paths meet at RGB.
_MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}
_PALETTE = "PALETTE COLOR"
_SUPPORTED_BITS_ALLOCATED = {8, 16}
# ITU-R BT.601 luma, the Y of DICOM's YBR_FULL (PS3.3 C.7.6.3.1.2).
_LUMA = np.array([0.299, 0.587, 0.114])
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class SourceFrame:
    """One frame of a source instance, ready for a pipeline.

    Attributes
    ----------
    dataset
        Header of the source instance without pixel data, for references
        and for copying the patient and study modules into results.
    frame_number
        1-based number of the analysed frame in a multi-frame object,
        ``None`` for a single-frame object.
    pixels
        The whole frame, uint8 grayscale, shape (rows, columns).
    scan_region_xywh
        Ultrasound scan region (x, y, width, height) in frame pixels: from
        the header when it has a 2D ultrasound region, else estimated from
        the pixels, which falls back to the whole frame.
    row_spacing_mm, column_spacing_mm
        Physical pixel size in mm when known, else ``None``.
    """

    dataset: pydicom.Dataset
    frame_number: int | None
    pixels: npt.NDArray[np.uint8]
    scan_region_xywh: tuple[int, int, int, int]
    row_spacing_mm: float | None
    column_spacing_mm: float | None

    @property
    def sop_instance_uid(self) -> str:
        """SOP Instance UID of the source instance."""
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        """SOP Class UID of the source instance."""
        return str(self.dataset.SOPClassUID)

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID of the source instance."""
        return str(self.dataset.SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        """Study Instance UID of the source instance."""
        return str(self.dataset.StudyInstanceUID)

    @property
    def scan_region_pixels(self) -> npt.NDArray[np.uint8]:
        """The scan-region crop of :attr:`pixels`, what a pipeline analyses."""
        x, y, w, h = self.scan_region_xywh
        return self.pixels[y : y + h, x : x + w]


def read_frames(
    path: pathlib.Path, max_frames: int = 1, limits: ImageLimits = DEFAULT_IMAGE_LIMITS
) -> list[SourceFrame]:
    """Read a DICOM file into analysable grayscale frames.

    Parameters
    ----------
    path
        A DICOM Part 10 file.
    max_frames
        How many frames to take from a multi-frame object: 1 takes the
        middle frame, more take that many evenly spaced frames (first and
        last included). Single-frame objects always give one frame.
    limits
        The largest frame and instance decoded; larger ones are refused
        from their header before any pixel is decoded.

    Returns
    -------
    list of SourceFrame
        In frame order; all share one header dataset.

    Raises
    ------
    InvalidInstance
        Unreadable or truncated file, missing UIDs or pixel data, or pixel
        data that does not match its description; ``ImageTooLarge`` where
        the header declares more than ``limits``.
    UnsupportedInput
        A transfer syntax, photometric interpretation, bit depth or sample
        layout this reader does not decode (the message names the value).
    FileNotFoundError
        If ``path`` does not exist (a spool problem, not a bad instance).
    ValueError
        If ``max_frames`` < 1.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    try:
        return _read_frames(path, max_frames, limits)
    except (BreastAIError, FileNotFoundError):
        raise
    except Exception as exc:
        # pydicom parses lazily and raises many types on garbage (NotImplementedError for an unknown VR, found by
        # fuzzing); any of them would otherwise fail the job as an internal error instead of naming the instance.
        raise InvalidInstance(f"{path.name}: unreadable DICOM: {type(exc).__name__}: {exc}") from exc


def _read_frames(path: pathlib.Path, max_frames: int, limits: ImageLimits) -> list[SourceFrame]:
    ds = _read_dataset(path)
    _check_decodable(ds, path)
    try:
        too_large = over_limits(ds, limits)
    except ValueError as exc:
        raise InvalidInstance(f"{path.name}: {exc}") from exc
    if too_large is not None:
        raise ImageTooLarge(f"{path.name}: {too_large}")
    rows, columns = int(ds.Rows), int(ds.Columns)
    frame_count = _frame_count(ds)
    indices = _frame_indices(frame_count, max_frames)
    # Objects with a Multi-frame module are decoded frame by frame (only the
    # chosen frames of a long compressed loop); others in one go.
    multi = "NumberOfFrames" in ds
    grays = [_decode_gray(ds, index if multi else None, path) for index in indices]

    # The header travels with every frame to the writers; dropping the pixel
    # data keeps jobs of long cine loops from holding them all in memory.
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)

    region = region_from_us_regions(ds)
    row_mm: float | None
    col_mm: float | None
    if region is not None:
        row_mm, col_mm = region.row_spacing_mm, region.column_spacing_mm
    else:
        row_mm, col_mm = _pixel_spacing_mm(ds)

    frames: list[SourceFrame] = []
    for index, gray in zip(indices, grays, strict=True):
        if gray.shape != (rows, columns):
            raise InvalidInstance(f"{path.name}: decoded frame has shape {gray.shape}, header says {(rows, columns)}")
        if region is not None:
            xywh = clip_box(region.xywh, rows, columns)
        else:
            xywh = clip_box(estimate_scan_region(gray), rows, columns)
        frames.append(
            SourceFrame(
                dataset=ds,
                frame_number=index + 1 if frame_count > 1 else None,
                pixels=gray,
                scan_region_xywh=xywh,
                row_spacing_mm=row_mm,
                column_spacing_mm=col_mm,
            )
        )
    return frames


def _read_dataset(path: pathlib.Path) -> pydicom.Dataset:
    """Parse the file (any other parse failure becomes InvalidInstance in :func:`read_frames`)."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise InvalidInstance(f"{path.name}: not a DICOM Part 10 file: {exc}") from exc
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            raise InvalidInstance(f"{path.name}: missing {keyword}")
    return ds


def _check_decodable(ds: pydicom.Dataset, path: pathlib.Path) -> None:
    """Refuse early, with the offending value named, what we cannot decode."""
    if "PixelData" not in ds:
        raise InvalidInstance(f"{path.name}: no Pixel Data (7FE0,0010)")
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise InvalidInstance(f"{path.name}: missing {keyword}")
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer_syntax is None:
        raise InvalidInstance(f"{path.name}: no Transfer Syntax UID in the file meta information")
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedInput(
            f"{path.name}: transfer syntax {transfer_syntax} ({transfer_syntax.name}) is not supported"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedInput(
            f"{path.name}: no installed decoder plugin for transfer syntax {transfer_syntax} ({transfer_syntax.name})"
        )
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in _MONOCHROME | _COLOUR | {_PALETTE}:
        raise UnsupportedInput(f"{path.name}: photometric interpretation {photometric!r} is not supported")
    bits = int(ds.BitsAllocated)
    if bits not in _SUPPORTED_BITS_ALLOCATED:
        raise UnsupportedInput(f"{path.name}: Bits Allocated {bits} is not supported (8 or 16)")
    samples = int(ds.SamplesPerPixel)
    expected_samples = 3 if photometric in _COLOUR else 1
    if samples != expected_samples:
        raise UnsupportedInput(
            f"{path.name}: Samples per Pixel {samples} does not fit photometric interpretation {photometric!r}"
        )


def _frame_count(ds: pydicom.Dataset) -> int:
    """Number of frames (PS3.3 C.7.6.6); absent or malformed means one."""
    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1
    return max(count, 1)


def _frame_indices(frame_count: int, max_frames: int) -> list[int]:
    """0-based frames to analyse: the middle one, or evenly spaced ones."""
    if frame_count == 1:
        return [0]
    if max_frames == 1:
        return [frame_count // 2]
    spaced = np.linspace(0, frame_count - 1, num=min(max_frames, frame_count))
    return sorted({round(value) for value in spaced})


def _decode_gray(ds: pydicom.Dataset, index: int | None, path: pathlib.Path) -> npt.NDArray[np.uint8]:
    """Decode one frame and reduce it to uint8 grayscale."""
    try:
        # index=None decodes the whole (single-frame) pixel data; an index
        # decodes only that frame, which matters for long compressed loops.
        array = ds.pixel_array if index is None else pixel_array(ds, index=index)
    except (NotImplementedError, RuntimeError) as exc:
        raise UnsupportedInput(f"{path.name}: cannot decode pixel data: {exc}") from exc
    except (ValueError, KeyError, AttributeError, EOFError, OSError, IndexError, TypeError) as exc:
        raise InvalidInstance(f"{path.name}: pixel data does not decode: {type(exc).__name__}: {exc}") from exc
    return to_gray_uint8(array, ds)


def to_gray_uint8(array: npt.NDArray[np.generic], ds: pydicom.Dataset) -> npt.NDArray[np.uint8]:
    """Reduce one decoded frame to uint8 grayscale, as the header says.

    Parameters
    ----------
    array
        One frame as returned by pydicom 3 with default options: (rows,
        columns) or, for colour, (rows, columns, 3) already in RGB.
    ds
        The header the frame came from (photometric interpretation, LUTs,
        rescale and window attributes).

    Returns
    -------
    numpy.ndarray
        uint8 (rows, columns).
    """
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric == _PALETTE:
        rgb = apply_color_lut(array, ds)
        return _luma(_to_uint8_rgb(rgb))
    if photometric in _COLOUR:
        return _luma(_to_uint8_rgb(array))
    gray = _monochrome_to_uint8(array, ds)
    if photometric == "MONOCHROME1":
        gray = np.subtract(255, gray, dtype=np.uint8)
    return gray


def _to_uint8_rgb(rgb: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Bring RGB samples to 8 bits; 16-bit LUT entries keep their top byte."""
    if rgb.dtype == np.uint8:
        return rgb.astype(np.uint8, copy=False)
    if rgb.dtype == np.uint16:
        top_byte: npt.NDArray[np.uint8] = (rgb.astype(np.uint16) >> 8).astype(np.uint8)
        return top_byte
    return _scale_to_uint8(rgb.astype(np.float64))


def _luma(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """BT.601 luma of an RGB uint8 image."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InvalidInstance(f"colour frame has shape {rgb.shape}, expected (rows, columns, 3)")
    luma = rgb.astype(np.float32) @ _LUMA.astype(np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def _monochrome_to_uint8(array: npt.NDArray[np.generic], ds: pydicom.Dataset) -> npt.NDArray[np.uint8]:
    """8-bit data passes through; deeper data is rescaled, then windowed or min-max scaled."""
    if array.ndim != 2:
        raise InvalidInstance(f"monochrome frame has shape {array.shape}, expected (rows, columns)")
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if array.dtype == np.uint8 and int(ds.get("BitsStored", 8)) <= 8 and not has_window:
        return array.astype(np.uint8, copy=False)
    values = np.asarray(apply_modality_lut(array, ds), dtype=np.float64)
    if has_window:
        center = _first_float(ds.WindowCenter)
        width = _first_float(ds.WindowWidth)
        if center is not None and width is not None and width >= 1:
            if str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() == "SIGMOID":
                return sigmoid_window_to_uint8(values, center, width)
            return window_to_uint8(values, center, width)
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(array, ds, index=0, prefer_lut=True), dtype=np.float64)
    return _scale_to_uint8(values)


def window_to_uint8(values: npt.NDArray[np.float64], center: float, width: float) -> npt.NDArray[np.uint8]:
    """Linear VOI windowing onto 0-255 (PS3.3 C.11.2.1.2.1).

    Values at or below ``center - 0.5 - (width - 1) / 2`` become 0, values
    above ``center - 0.5 + (width - 1) / 2`` become 255, linear between.
    """
    low = center - 0.5 - (width - 1.0) / 2.0
    scaled = ((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0 if width > 1 else (values > low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def sigmoid_window_to_uint8(values: npt.NDArray[np.float64], center: float, width: float) -> npt.NDArray[np.uint8]:
    """Sigmoid VOI windowing onto 0-255 (PS3.3 C.11.2.1.3.1), which several mammography vendors specify.

    ``y = 255 / (1 + exp(-4 (x - center) / width))``.
    """
    exponent = np.clip(-4.0 * (values - center) / width, -60.0, 60.0)
    return np.clip(np.rint(255.0 / (1.0 + np.exp(exponent))), 0, 255).astype(np.uint8)


def _first_float(value: object) -> float | None:
    """First value of a possibly multi-valued DS element as float."""
    try:
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0]
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None


def _scale_to_uint8(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Linearly map the data's own min-max onto 0-255 (no window known)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float | None, float | None]:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing over the magnification factor.

    Projection radiography (mammography) often gives only Imager Pixel
    Spacing (0018,1164), measured at the detector; sizes in the patient are
    that divided by Estimated Radiographic Magnification Factor (0018,1114)
    when present (PS3.3 C.8.11.7, and 10.7.1.3 on the choice of spacing).
    """
    spacing = _spacing_pair(ds.get("PixelSpacing"))
    if spacing is None:  # an enhanced multi-frame object (an Enhanced US Volume) keeps it in Pixel Measures
        spacing = _spacing_pair(functional_group_value(ds, None, "PixelMeasuresSequence", "PixelSpacing"))
    if spacing is not None:
        return spacing
    imager = _spacing_pair(ds.get("ImagerPixelSpacing"))
    if imager is None:
        return None, None
    magnification = _first_float(ds.get("EstimatedRadiographicMagnificationFactor"))
    if magnification is None or not (1.0 <= magnification <= 4.0):  # absent or implausible: detector spacing
        magnification = 1.0
    return imager[0] / magnification, imager[1] / magnification


def _spacing_pair(spacing: object) -> tuple[float, float] | None:
    """A (row, column) spacing in mm from a 2-valued DS element, when present and sane."""
    if not isinstance(spacing, (list, tuple, MultiValue)) or len(spacing) != 2:
        return None
    try:
        row_mm, col_mm = float(spacing[0]), float(spacing[1])
    except (TypeError, ValueError):
        return None
    if not (row_mm > 0 and col_mm > 0 and np.isfinite(row_mm) and np.isfinite(col_mm)):
        return None
    return row_mm, col_mm


def chest_wall_on_left(ds: pydicom.Dataset) -> bool | None:
    """Whether a projection image shows the chest wall at its left edge, from Patient Orientation; ``None`` if unsaid.

    PS3.3 C.7.6.1.1.1: the first value of Patient Orientation (0020,0020) is
    the patient direction of the rows (towards increasing column index). A
    mammogram whose rows run anterior ("A", towards the nipple) has the chest
    wall on the left; one whose rows run posterior ("P") has it on the right.
    Laterality alone does not say it: vendors store right breasts either way.
    """
    orientation = ds.get("PatientOrientation")
    if not isinstance(orientation, (list, tuple, MultiValue)) or len(orientation) != 2:
        return None
    row_direction = str(orientation[0]).strip().upper()
    if row_direction.startswith("A"):
        return True
    if row_direction.startswith("P"):
        return False
    return None
