"""Training crops keep the lesion; runs resume only under their own settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from models.datasets import Record
from models.errors import TrainingError
from models.training import train_family
from models.training.samples import LesionSample, training_input


def _ramp(rows: int = 120, cols: int = 160) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def _lesion_sample(box: tuple[int, int, int, int] = (60, 40, 40, 30)) -> LesionSample:
    """A dark ellipse on a bright, textured background, with its box."""
    rng = np.random.default_rng(3)
    image = rng.integers(150, 220, (200, 260)).astype(np.uint8)
    x, y, w, h = box
    yy, xx = np.mgrid[0:200, 0:260]
    inside = ((xx - (x + (w - 1) / 2)) / (w / 2)) ** 2 + ((yy - (y + (h - 1) / 2)) / (h / 2)) ** 2 <= 1
    image[inside] = 20
    record = Record("synthetic", "lesion", Path("lesion.png"), None, 1, "p", "d", "train")
    return LesionSample(record, image, box, 1)


def test_every_training_crop_keeps_the_lesion_near_its_centre() -> None:
    spec = train_family.FAMILIES["dlr_bm"]
    sample = _lesion_sample()
    rng = np.random.default_rng(11)
    for _ in range(40):
        crop = training_input(spec.roi, sample, 64, rng)[0, 0]
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
    assert [len(b) for b in epoch_batches(np.random.default_rng(7), 3, 4)] == [
        3
    ]  # fewer items than a batch: one short batch


def test_a_run_resumes_only_under_the_settings_it_was_started_with(tmp_path: Path) -> None:
    import json

    from models.training.loop import check_resumable

    started = {"family": "dlr_bm", "init": "", "seed": 1, "epochs": 30, "threads": 2}
    defining = ("family", "init", "seed")
    (tmp_path / "config.json").write_text(json.dumps(started))
    check_resumable(
        tmp_path, {**started, "init": "runs/pretrain-masks/dlr_bm/best.pt"}, defining
    )  # no checkpoint yet: nothing to resume
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    check_resumable(tmp_path, {**started, "epochs": 40, "threads": 1}, defining)  # more epochs, other threads: same run
    with pytest.raises(
        TrainingError, match=r"init: '' -> 'runs/pretrain-masks/dlr_bm/best.pt'; seed: 1 -> 2\).*another --work"
    ):
        check_resumable(tmp_path, {**started, "init": "runs/pretrain-masks/dlr_bm/best.pt", "seed": 2}, defining)
