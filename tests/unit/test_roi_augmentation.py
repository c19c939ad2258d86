"""Training-crop augmentation: the turned crop's geometry, the scanner-preset jitter, and that serving never sees it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from models.training import train_family  # noqa: E402
from models.training.data import Record  # noqa: E402
from models.training.loop import augment_contrast_and_blur, rotated_crop  # noqa: E402


def _ramp(rows: int = 120, cols: int = 160) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def _lesion_sample(box: tuple[int, int, int, int] = (60, 40, 40, 30)) -> train_family.LesionSample:
    """A dark ellipse on a bright, textured background, with its box."""
    rng = np.random.default_rng(3)
    image = rng.integers(150, 220, (200, 260)).astype(np.uint8)
    x, y, w, h = box
    yy, xx = np.mgrid[0:200, 0:260]
    inside = ((xx - (x + (w - 1) / 2)) / (w / 2)) ** 2 + ((yy - (y + (h - 1) / 2)) / (h / 2)) ** 2 <= 1
    image[inside] = 20
    record = Record("synthetic", "lesion", Path("lesion.png"), None, 1, "p", "d", "train")
    return train_family.LesionSample(record, image, box, 1)


def test_an_unturned_crop_is_the_plain_crop() -> None:
    image = _ramp()
    assert np.array_equal(rotated_crop(image, (30, 20, 50, 40), 0.0), image[20:60, 30:80])


def test_a_quarter_turn_of_a_square_crop_is_numpys_counter_clockwise_rotation() -> None:
    image = _ramp()
    # cv2 turns positive angles counter-clockwise, as np.rot90 with k = 1 does.
    assert np.array_equal(rotated_crop(image, (40, 30, 51, 51), 90.0), np.rot90(image[30:81, 40:91]))


def test_a_turned_crop_at_the_edge_mirrors_the_image_instead_of_padding_black() -> None:
    image = np.full((100, 100), 200, dtype=np.uint8)
    turned = rotated_crop(image, (0, 0, 60, 60), 30.0)
    assert turned.shape == (60, 60) and turned.min() == 200


def test_contrast_and_blur_keep_shape_and_type_and_follow_the_seed() -> None:
    image = _ramp()
    first = augment_contrast_and_blur(image, np.random.default_rng(5))
    again = augment_contrast_and_blur(image, np.random.default_rng(5))
    other = augment_contrast_and_blur(image, np.random.default_rng(6))
    assert first.dtype == np.uint8 and first.shape == image.shape
    assert np.array_equal(first, again) and not np.array_equal(first, other) and not np.array_equal(first, image)


def test_augmentation_override_changes_training_crops_only() -> None:
    spec = train_family.FAMILIES["dl_u"]
    assert spec.roi.augmentation == "standard"
    assert train_family.with_augmentation(spec, None) is spec
    strong = train_family.with_augmentation(spec, "strong")
    assert strong.roi.augmentation == "strong" and replace(strong.roi, augmentation="standard") == spec.roi
    with pytest.raises(ValueError, match="not one of"):
        train_family.with_augmentation(spec, "extreme")
    sample = _lesion_sample()
    # Serving and validation cut the same ROI whatever the training crops were.
    assert np.array_equal(strong.roi.evaluation_input(sample, 64), spec.roi.evaluation_input(sample, 64))
    standard_crops = [spec.roi.training_input(sample, 64, np.random.default_rng(k)) for k in range(4)]
    strong_crops = [strong.roi.training_input(sample, 64, np.random.default_rng(k)) for k in range(4)]
    assert all(c.shape == (1, 1, 64, 64) and c.dtype == np.float32 for c in standard_crops + strong_crops)
    assert not any(np.array_equal(a, b) for a, b in zip(standard_crops, strong_crops))


@pytest.mark.parametrize("augmentation", ["standard", "strong"])
def test_every_training_crop_keeps_the_lesion_near_its_centre(augmentation: str) -> None:
    spec = train_family.with_augmentation(train_family.FAMILIES["dlr_bm"], augmentation)
    sample = _lesion_sample()
    rng = np.random.default_rng(11)
    for _ in range(40):
        crop = spec.roi.training_input(sample, 64, rng)[0, 0]
        dark = crop < (crop.min() + crop.max()) / 2  # the lesion is the dark blob, far below the tissue around it
        centre_y, centre_x = np.argwhere(dark).mean(axis=0)
        assert abs(centre_y - 31.5) < 64 * 0.2 and abs(centre_x - 31.5) < 64 * 0.2
        assert dark.mean() > 0.15  # the lesion fills a good part of every crop


def test_epoch_batches_are_one_permutation_cut_into_full_batches() -> None:
    from models.training.loop import epoch_batches

    batches = epoch_batches(np.random.default_rng(7), 11, 4)
    # 11 items in batches of 4: two full batches; the partial third (3 items) is dropped, none is repeated.
    assert [len(b) for b in batches] == [4, 4]
    drawn = np.concatenate(batches)
    assert len(set(drawn.tolist())) == 8 and set(drawn.tolist()) <= set(range(11))
    assert [len(b) for b in epoch_batches(np.random.default_rng(7), 3, 4)] == [3]  # fewer items than a batch: one short batch


def test_a_run_resumes_only_under_the_settings_it_was_started_with(tmp_path: Path) -> None:
    import json

    from models.training.loop import check_resumable

    started = {"family": "dlr_bm", "init": "", "seed": 1, "epochs": 30, "threads": 2}
    defining = ("family", "init", "seed")
    (tmp_path / "config.json").write_text(json.dumps(started))
    check_resumable(tmp_path, {**started, "init": "runs/pretrain-masks/dlr_bm/best.pt"}, defining)  # no checkpoint yet: nothing to resume
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    check_resumable(tmp_path, {**started, "epochs": 40, "threads": 1}, defining)  # more epochs, other threads: same run
    with pytest.raises(SystemExit, match=r"init: '' -> 'runs/pretrain-masks/dlr_bm/best.pt'; seed: 1 -> 2\).*another --work"):
        check_resumable(tmp_path, {**started, "init": "runs/pretrain-masks/dlr_bm/best.pt", "seed": 2}, defining)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((10, 20, 30, 10), (10, 10, 30, 30)),  # wider than tall: widened about its centre
        ((40, 5, 8, 24), (32, 5, 24, 24)),  # taller than wide
        ((0, 0, 50, 10), (0, 0, 50, 50)),  # at the top-left corner: moved inward, not clipped
        ((150, 90, 40, 10), (150, 60, 40, 40)),  # at the bottom edge
        ((0, 20, 180, 40), (0, 0, 180, 100)),  # wider than the image is tall: only then cut to the image
    ],
)
def test_square_box_keeps_the_box_inside_a_square_window(box: tuple[int, int, int, int], expected: tuple[int, int, int, int]) -> None:
    from models.inference.preprocess import square_box

    window = square_box(box, (100, 200))
    assert window == expected
    x, y, w, h = box
    wx, wy, ww, wh = window
    assert wx <= x and wy <= y and x + w <= wx + ww and min(y + h, 100) <= wy + wh  # the lesion stays whole
    assert 0 <= wx and 0 <= wy and wx + ww <= 200 and wy + wh <= 100


def test_square_rois_keep_a_lesions_orientation_that_the_stretched_box_loses() -> None:
    wide, tall = _lesion_sample((60, 80, 90, 30)), _lesion_sample((110, 40, 30, 90))
    stretched = train_family.FAMILIES["dlr_bm"]
    square = train_family.with_square_roi(stretched, True)
    assert train_family.with_square_roi(stretched, False) is stretched and square.roi.square

    def dark_extent(spec: train_family.FamilySpec, sample: train_family.LesionSample) -> tuple[int, int]:
        crop = spec.roi.evaluation_input(sample, 64)[0, 0]
        rows, cols = np.nonzero(crop < (crop.min() + crop.max()) / 2)
        return int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1

    # The stretched box turns both lesions into the same near-round blob.
    for sample in (wide, tall):
        rows, cols = dark_extent(stretched, sample)
        assert abs(rows - cols) <= 4
    # The square window keeps them 3:1 and 1:3.
    rows, cols = dark_extent(square, wide)
    assert cols > 2.5 * rows
    rows, cols = dark_extent(square, tall)
    assert rows > 2.5 * cols
    crops = [square.roi.training_input(wide, 64, np.random.default_rng(k))[0, 0] for k in range(6)]
    for crop in crops:
        rows_idx, cols_idx = np.nonzero(crop < (crop.min() + crop.max()) / 2)
        assert np.ptp(cols_idx) > 2 * np.ptp(rows_idx)  # training crops are square windows too
