"""Lesion post-processing, CAM normalisation and ROI geometry (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from models.inference.cam import normalise_cam, paste
from models.inference.findings import Lesion
from models.inference.lesions import find_components, outline_of
from models.inference.preprocess import crop, expand_box, standardise


def test_components_are_found_sorted_and_speckle_dropped() -> None:
    probability = np.zeros((100, 200), np.float32)
    probability[10:40, 20:60] = 0.9  # 1200 px
    probability[60:70, 150:160] = 0.8  # 100 px
    probability[90, 5] = 1.0  # 1 px speckle: below 0.2 % of 20000
    components = find_components(probability, threshold=0.5, min_area_fraction=0.002)
    assert [c.box for c in components] == [(20, 10, 40, 30), (150, 60, 10, 10)]
    assert components[0].area_px == 1200
    assert components[0].mean_probability == pytest.approx(0.9)


def test_outline_is_closed_and_inside_the_mask_box() -> None:
    mask = np.zeros((50, 50), bool)
    mask[5:15, 20:40] = True
    outline = outline_of(mask)
    assert np.array_equal(outline[0], outline[-1])
    assert outline[:, 0].min() == 20 and outline[:, 0].max() == 39
    assert outline[:, 1].min() == 5 and outline[:, 1].max() == 14


def test_longest_diameter_uses_physical_spacing() -> None:
    outline = np.array([[0, 0], [30, 0], [30, 10], [0, 10], [0, 0]], np.float32)
    lesion = Lesion(outline, (0, 0, 31, 11), 341, 0.5, np.zeros((1, 1), np.float32))
    assert lesion.longest_diameter_mm(0.1, 0.1) == pytest.approx(np.hypot(3.0, 1.0))
    # Tall pixels: 10 rows of 1 mm beat 30 columns of 0.1 mm.
    assert lesion.longest_diameter_mm(1.0, 0.1) == pytest.approx(np.hypot(3.0, 10.0))


def test_cam_normalisation_and_paste() -> None:
    raw = np.array([[-1.0, 0.0], [1.0, 3.0]], np.float32)
    cam = normalise_cam(raw, (20, 10))
    assert cam.shape == (20, 10) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    assert np.all(normalise_cam(-np.ones((2, 2), np.float32), (4, 4)) == 0)
    canvas = paste(np.ones((3, 4), np.float32), (5, 2, 4, 3), (10, 12))
    assert canvas.sum() == 12 and canvas[2:5, 5:9].all()


def test_expand_box_clips_to_image_and_crop_matches() -> None:
    assert expand_box((10, 10, 20, 10), (100, 100), 0.5) == (0, 5, 40, 20)
    assert expand_box((90, 90, 10, 10), (100, 100), 0.5) == (85, 85, 15, 15)
    image = np.arange(100 * 100, dtype=np.uint8).reshape(100, 100)
    assert crop(image, (3, 4, 5, 6)).shape == (6, 5)


def test_standardise_shape_and_statistics() -> None:
    image = np.random.default_rng(0).integers(0, 255, (300, 200), dtype=np.uint8)
    x = standardise(image, 64)
    assert x.shape == (1, 1, 64, 64) and x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="non-empty 2D"):
        standardise(np.zeros((0, 5), np.uint8), 64)
