"""What pretraining reads: the ultrasound images of the training split, and the windows cut around their lesions.

The papers start from ImageNet weights, which cannot be had here. The
stand-in adopted is mask pretraining of the family's own network
(:mod:`models.training.mask_pretraining`): it learns the lesion outlines of
every ultrasound image of the training split (normal images included; the
masks place the windows, the labels are never read), then ``breastai train
FAMILY --init runs/pretrain-masks/FAMILY/best.pt`` fine-tunes it with its
family's recipe. Images of the validation and test splits are left out of
the training: validation picks the checkpoint, and the test numbers stay
those of images no stage of training has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.datasets import US_DATASETS, load_records, mask_box, read_gray, read_mask
from models.inference.preprocess import Box
from models.training.run_config import TrainConfig


@dataclass(frozen=True)
class PretrainImage:
    """One grayscale image and, where it has a lesion mask, the box of its largest lesion and the mask."""

    image: npt.NDArray[np.uint8]
    box: Box | None
    mask: npt.NDArray[np.uint8] | None = None

    def lesion_mask(self) -> npt.NDArray[np.uint8]:
        """The 0/1 lesion mask, all zeros for an image without lesions."""
        return self.mask if self.mask is not None else np.zeros(self.image.shape[:2], dtype=np.uint8)


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """A pretraining run: a reference run's settings plus the family whose network it pretrains."""

    family: str
    # The one pretraining objective kept (SimCLR was tried and not adopted: docs/history.md). No flag sets it: it is
    # recorded in config.json because resuming and the export's initialisation() read it from run folders.
    objective: str = "masks"
    holdout: str = ""  # a dataset left out entirely (external validation, models.training.external)


# Settings that make a different pretrained network (a run resumes only under the same ones; epochs may grow).
PRETRAINING_DEFINING = ("family", "objective", "holdout", "seed", "batch_size", "learning_rate", "input_size")


def pretraining_images(datasets: Path, splits: tuple[str, ...] = ("train",), holdout: str = "") -> list[PretrainImage]:
    """Every ultrasound image of ``splits`` (normal ones included), with its lesion box where it has a mask.

    Training images only by default: the validation split later picks the
    fine-tuned checkpoint and the operating point, and should be as unseen as the test.
    ``holdout`` names a dataset none of whose images is read (external validation).
    """
    images = []
    for record in load_records(datasets, US_DATASETS):
        if record.split not in splits or record.dataset == holdout:
            continue
        gray = read_gray(record.image_path)
        mask = read_mask(record, gray.shape) if record.mask_path is not None else None
        box = mask_box(mask) if mask is not None else None
        images.append(PretrainImage(gray, box, mask if box is not None else None))
    return images


def anchor_region(item: PretrainImage, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Centre x, centre y, width, height of the region a mask-pretraining window (image and mask) is cut around."""
    rows, cols = item.image.shape[:2]
    if item.box is not None:
        x, y, w, h = item.box
        grow = 1.0 + rng.uniform(0.0, 0.6)
        return x + w / 2, y + h / 2, w * grow, h * grow
    side = rng.uniform(0.3, 0.8) * min(rows, cols)
    return rng.uniform(side / 2, cols - side / 2), rng.uniform(side / 2, rows - side / 2), side, side


def jittered_window(
    item: PretrainImage, region: tuple[float, float, float, float], rng: np.random.Generator
) -> tuple[Box, bool]:
    """``region`` shifted by up to 20 % and scaled 0.75-1.3, clipped to the image; and whether to mirror it."""
    rows, cols = item.image.shape[:2]
    cx, cy, w, h = region
    scale = rng.uniform(0.75, 1.3)
    w, h = max(8.0, w * scale), max(8.0, h * scale)
    cx += rng.uniform(-0.2, 0.2) * w
    cy += rng.uniform(-0.2, 0.2) * h
    x0 = int(np.clip(cx - w / 2, 0, cols - 8))
    y0 = int(np.clip(cy - h / 2, 0, rows - 8))
    return (x0, y0, int(min(w, cols - x0)), int(min(h, rows - y0))), bool(rng.random() < 0.5)
