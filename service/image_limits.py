"""What an image data set declares it will decode to, checked before a single pixel is decoded.

A C-STORE's size on the wire says little about its decoded size: an RLE or
JPEG instance of a few megabytes can declare 12000 x 12000 pixels of 16 bits,
and decoding it (then converting it to floating point) takes gigabytes.
Rows, Columns, Number of Frames, Samples per Pixel and Bits Allocated
(PS3.3 C.7.6.3, C.7.6.6) say what decoding will allocate; the listener
refuses an instance whose declaration exceeds the limits, and the worker
checks again before it decodes (an instance spooled before the limits were
lowered, or read by ``breastai analyze``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.dataset import Dataset

#: One frame of the largest full-field digital mammography detectors is about 28 megapixels (5928 x 4728 at 50 um).
DEFAULT_MAX_FRAME_MEGAPIXELS = 40
#: A whole multi-frame instance (an automated breast volume of a few hundred frames, a cine loop).
DEFAULT_MAX_DECODED_MB = 2048


@dataclass(frozen=True)
class ImageLimits:
    """The largest frame and the largest whole instance we decode."""

    max_frame_megapixels: int = DEFAULT_MAX_FRAME_MEGAPIXELS
    max_decoded_mb: int = DEFAULT_MAX_DECODED_MB


#: The defaults, one frozen instance (what ``breastai analyze`` and tests use).
DEFAULT_IMAGE_LIMITS = ImageLimits()


@dataclass(frozen=True)
class DeclaredSize:
    """What an image data set's header says decoding it will produce."""

    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns

    @property
    def decoded_bytes(self) -> int:
        return self.frame_pixels * self.frames * self.samples_per_pixel * math.ceil(self.bits_allocated / 8)


def _positive_int(ds: Dataset, keyword: str, default: int | None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{keyword} is not a number") from exc
    if number < 1:
        raise ValueError(f"{keyword} must be at least 1, not {number}")
    return number


def declared_size(ds: Dataset) -> DeclaredSize | None:
    """The decoded size ``ds`` declares; ``None`` for a data set without Rows and Columns (not an image).

    Raises
    ------
    ValueError
        If one of the attributes is present but not a positive integer.
    """
    rows = _positive_int(ds, "Rows", None)
    columns = _positive_int(ds, "Columns", None)
    if rows is None or columns is None:
        return None
    return DeclaredSize(
        rows=rows,
        columns=columns,
        frames=_positive_int(ds, "NumberOfFrames", 1) or 1,
        samples_per_pixel=_positive_int(ds, "SamplesPerPixel", 1) or 1,
        bits_allocated=_positive_int(ds, "BitsAllocated", 8) or 8,
    )


def over_limits(ds: Dataset, limits: ImageLimits) -> str | None:
    """Why ``ds`` is too large to decode, or ``None`` if it is not (or declares no image).

    Raises
    ------
    ValueError
        If a size attribute is malformed (see :func:`declared_size`).
    """
    size = declared_size(ds)
    if size is None:
        return None
    if size.frame_pixels > limits.max_frame_megapixels * 1_000_000:
        return (
            f"a frame of {size.columns} x {size.rows} pixels exceeds max_frame_megapixels={limits.max_frame_megapixels}"
        )
    if size.decoded_bytes > limits.max_decoded_mb * 1024 * 1024:
        return (
            f"{size.frames} frame(s) of {size.columns} x {size.rows} x {size.samples_per_pixel} samples, "
            f"{size.bits_allocated} bits, decode to {size.decoded_bytes / 2**20:.0f} MB, more than max_decoded_mb="
            f"{limits.max_decoded_mb}"
        )
    return None
