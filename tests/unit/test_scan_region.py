"""workers.scan_region on synthetic headers and arrays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydicom import Dataset

from workers.scan_region import clip_box, estimate_scan_region, region_from_us_regions


def _region(x0: int, y0: int, x1: int, y1: int, *, fmt: int = 1, units: int = 3, delta: float = 0.01) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = fmt
    item.RegionDataType = 1
    item.RegionLocationMinX0 = x0
    item.RegionLocationMinY0 = y0
    item.RegionLocationMaxX1 = x1
    item.RegionLocationMaxY1 = y1
    item.PhysicalUnitsXDirection = units
    item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX = delta
    item.PhysicalDeltaY = delta * 2
    return item


def _header(*regions: Dataset, rows: int = 600, columns: int = 800) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = rows, columns
    if regions:
        ds.SequenceOfUltrasoundRegions = list(regions)
    return ds


def test_largest_2d_region_wins_and_cm_become_mm() -> None:
    ds = _header(
        _region(10, 10, 109, 59, delta=0.02),  # small 2D region
        _region(120, 60, 799, 518, delta=0.0262),  # main B-mode view
        _region(0, 520, 799, 599, fmt=4),  # larger than the first, but a spectral strip
    )
    region = region_from_us_regions(ds)
    assert region is not None
    assert region.xywh == (120, 60, 680, 459)
    assert region.column_spacing_mm == pytest.approx(0.262)
    assert region.row_spacing_mm == pytest.approx(0.524)


def test_region_bounds_are_clipped_to_the_frame() -> None:
    # Some vendors write Max X1 = Columns (one past the last column).
    region = region_from_us_regions(_header(_region(120, 60, 800, 600)))
    assert region is not None
    assert region.xywh == (120, 60, 680, 540)


def test_units_other_than_cm_give_no_spacing() -> None:
    region = region_from_us_regions(_header(_region(0, 0, 99, 99, units=0, delta=0.0)))
    assert region is not None
    assert region.xywh == (0, 0, 100, 100)
    assert region.row_spacing_mm is None and region.column_spacing_mm is None


def test_no_usable_region() -> None:
    assert region_from_us_regions(_header()) is None
    assert region_from_us_regions(_header(_region(0, 0, 99, 99, fmt=3))) is None
    assert region_from_us_regions(_header(_region(50, 50, 10, 10))) is None


def _fan_image(rows: int = 480, columns: int = 640) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Black frame, speckled sector, text and a caliper line around it."""
    rng = np.random.default_rng(1)
    mask = np.zeros((rows, columns), np.uint8)
    apex = (columns // 2, 40)
    cv2.ellipse(mask, apex, (400, 400), 90, -35, 35, 1, thickness=-1)
    mask[:40] = 0
    mask[rows - 30 :] = 0
    speckle = rng.normal(100, 30, size=(rows, columns)).clip(20, 255).astype(np.uint8)
    image = np.where(mask > 0, speckle, 0).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    truth = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    cv2.putText(image, "GE LOGIQ  L12  FR 21", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1)
    cv2.putText(image, "ANON^TEST", (520, 460), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1)
    cv2.line(image, (5, 100), (5, 400), 255, 1)  # depth scale
    cv2.line(image, (600, 150), (635, 150), 200, 1)  # caliper
    return image, truth


def test_fan_is_found_despite_text_and_calipers() -> None:
    image, (tx, ty, tw, th) = _fan_image()
    x, y, w, h = estimate_scan_region(image)
    # Within a few pixels of the true fan: the opening shaves its corners.
    assert abs(x - tx) <= 8 and abs(y - ty) <= 8
    assert abs((x + w) - (tx + tw)) <= 8 and abs((y + h) - (ty + th)) <= 8


def test_rectangle_scan_area() -> None:
    image = np.zeros((300, 400), np.uint8)
    image[50:250, 80:330] = np.random.default_rng(2).integers(30, 220, size=(200, 250), dtype=np.uint8)
    cv2.putText(image, "12 cm", (340, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    x, y, w, h = estimate_scan_region(image)
    assert abs(x - 80) <= 4 and abs(y - 50) <= 4 and abs(w - 250) <= 6 and abs(h - 200) <= 6


@pytest.mark.parametrize("fill", [0, 255])
def test_unconvincing_images_give_the_whole_frame(fill: int) -> None:
    image = np.full((120, 160), fill, np.uint8)
    assert estimate_scan_region(image) == (0, 0, 160, 120)


def test_only_small_specks_give_the_whole_frame() -> None:
    image = np.zeros((200, 200), np.uint8)
    image[10:20, 10:20] = 200
    assert estimate_scan_region(image) == (0, 0, 200, 200)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="2D"):
        estimate_scan_region(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        estimate_scan_region(np.zeros((0, 5), np.uint8))


def test_clip_box() -> None:
    assert clip_box((-5, -5, 20, 20), 10, 10) == (0, 0, 10, 10)
    assert clip_box((50, 50, 5, 5), 10, 10) == (0, 0, 10, 10)
    assert clip_box((2, 3, 4, 5), 10, 10) == (2, 3, 4, 5)
