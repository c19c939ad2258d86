"""Where the ultrasound image proper lies inside a captured frame.

Ultrasound frames carry more than the scan: vendor logos, text, a grey-scale
bar, calipers, sometimes a second view. The models are trained on the scan
area only, so the reader crops to it and the writers add the crop offset
back to every coordinate.

Two sources, in order of trust:

1. the header: Sequence of Ultrasound Regions (PS3.3 C.8.5.5, US Region
   Calibration Module), which names each region's bounds, spatial format and
   physical calibration (:func:`region_from_us_regions`);
2. the pixels: the bounding box of the largest bright connected area, the
   fan or rectangle of the B-mode scan (:func:`estimate_scan_region`).

All functions here are pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from pydicom import Dataset

# PS3.3 C.8.5.5.1.1 Region Spatial Format: 1 = 2D (tissue or flow).
_SPATIAL_FORMAT_2D = 1
# PS3.3 C.8.5.5.1.15 Physical Units X/Y Direction: 3 = cm.
_UNITS_CM = 3

# Grey level above which a (smoothed) pixel counts as scan rather than
# background; ultrasound backgrounds are black or nearly so.
_FOREGROUND_LEVEL = 12
# A component smaller than this share of the image is not trusted as "the"
# scan area: the estimate then falls back to the whole image.
_MIN_AREA_FRACTION = 0.05


@dataclass(frozen=True)
class UltrasoundRegion:
    """One calibrated 2D region from the Sequence of Ultrasound Regions.

    Attributes
    ----------
    xywh
        Region bounds in frame pixels (x, y, width, height), clipped to the
        frame.
    row_spacing_mm, column_spacing_mm
        Physical size of a pixel along rows (y) and columns (x) in mm, or
        ``None`` when the region is not calibrated in centimetres.
    """

    xywh: tuple[int, int, int, int]
    row_spacing_mm: float | None
    column_spacing_mm: float | None


def region_from_us_regions(ds: Dataset) -> UltrasoundRegion | None:
    """Pick the main 2D scan region from a Sequence of Ultrasound Regions.

    Implements the selection rule of this project on PS3.3 C.8.5.5: among the
    items with Region Spatial Format 1 (2D), the one covering the largest
    area wins (a dual view or a small flow box loses to the main B-mode
    view). Physical Delta X/Y are in cm when Physical Units X/Y Direction is
    3, so spacing in mm is ``|delta| * 10``; other units give no spacing.

    Parameters
    ----------
    ds
        Dataset with Rows, Columns and optionally SequenceOfUltrasoundRegions.

    Returns
    -------
    UltrasoundRegion or None
        ``None`` when there is no usable 2D region.
    """
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return None
    rows = int(ds.get("Rows", 0) or 0)
    columns = int(ds.get("Columns", 0) or 0)
    best: tuple[int, UltrasoundRegion] | None = None
    for item in regions:
        if item.get("RegionSpatialFormat") != _SPATIAL_FORMAT_2D:
            continue
        try:
            x0 = int(item.RegionLocationMinX0)
            y0 = int(item.RegionLocationMinY0)
            x1 = int(item.RegionLocationMaxX1)
            y1 = int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        # Max X1/Y1 are inclusive pixel indices; some vendors write one past
        # the last column, hence the clipping to the frame.
        if columns > 0:
            x0, x1 = max(0, x0), min(columns - 1, x1)
        if rows > 0:
            y0, y1 = max(0, y0), min(rows - 1, y1)
        width, height = x1 - x0 + 1, y1 - y0 + 1
        if width <= 0 or height <= 0:
            continue
        region = UltrasoundRegion(
            xywh=(x0, y0, width, height),
            row_spacing_mm=_spacing_mm(item, "PhysicalUnitsYDirection", "PhysicalDeltaY"),
            column_spacing_mm=_spacing_mm(item, "PhysicalUnitsXDirection", "PhysicalDeltaX"),
        )
        if best is None or width * height > best[0]:
            best = (width * height, region)
    return None if best is None else best[1]


def _spacing_mm(item: Dataset, units_keyword: str, delta_keyword: str) -> float | None:
    """Pixel size in mm along one axis of an ultrasound region, if in cm."""
    if item.get(units_keyword) != _UNITS_CM:
        return None
    delta = item.get(delta_keyword)
    if delta is None:
        return None
    spacing = abs(float(delta)) * 10.0
    return spacing if spacing > 0 and np.isfinite(spacing) else None


def estimate_scan_region(gray: npt.NDArray[np.uint8]) -> tuple[int, int, int, int]:
    """Estimate the scan area as the largest bright connected area.

    Smoothing joins the speckle of tissue into one area; a morphological
    opening with a kernel wider than text strokes and caliper lines detaches
    those annotations so that they cannot stretch the box; the bounding box
    of the largest remaining component is the scan (fan or rectangle).

    Parameters
    ----------
    gray
        2D uint8 image (rows, columns).

    Returns
    -------
    tuple of int
        (x, y, width, height), never empty: the whole image when no
        convincing area is found (blank frame, or everything bright).

    Raises
    ------
    ValueError
        If ``gray`` is not a non-empty 2D array.
    """
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"estimate_scan_region needs a non-empty 2D array, got shape {gray.shape}")
    rows, columns = gray.shape
    whole = (0, 0, int(columns), int(rows))
    image = np.ascontiguousarray(gray, dtype=np.uint8)
    side = min(rows, columns)
    if side < 8:
        return whole
    blur = max(3, (side // 100) | 1)
    smoothed = cv2.GaussianBlur(image, (blur, blur), 0)
    mask = (smoothed > _FOREGROUND_LEVEL).astype(np.uint8)
    # Text and calipers are a few pixels thick; an opening about 2% of the
    # image wide removes them while the scan area survives.
    k = max(3, (side // 50) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = np.asarray(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), dtype=np.uint8)
    count, _labels, stats, _centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return whole
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = 1 + int(np.argmax(areas))
    if stats[best, cv2.CC_STAT_AREA] < _MIN_AREA_FRACTION * rows * columns:
        return whole
    x = int(stats[best, cv2.CC_STAT_LEFT])
    y = int(stats[best, cv2.CC_STAT_TOP])
    w = int(stats[best, cv2.CC_STAT_WIDTH])
    h = int(stats[best, cv2.CC_STAT_HEIGHT])
    return (x, y, w, h) if w > 0 and h > 0 else whole


def clip_box(xywh: tuple[int, int, int, int], rows: int, columns: int) -> tuple[int, int, int, int]:
    """Clip a box to an image of ``rows`` x ``columns``; the whole image if nothing is left."""
    x, y, w, h = xywh
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(columns, x + w), min(rows, y + h)
    if x1 <= x0 or y1 <= y0:
        return (0, 0, columns, rows)
    return (x0, y0, x1 - x0, y1 - y0)
