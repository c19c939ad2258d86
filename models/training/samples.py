"""Lesion samples of the development datasets and the network inputs cut from them, for every family recipe.

A :class:`LesionSample` is one lesion: the full grayscale image, the box of
its ground-truth outline's largest region, its label and the record it came
from. The family's :class:`models.families.spec.RoiStyle` cuts the same ROI
for validation, export and serving (:func:`evaluation_input`); training
crops are jittered around it (:func:`training_input`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.datasets import Record, birads_high, load_records, mask_box, mias_findings, read_gray, read_mask
from models.errors import TrainingError
from models.families.finish_run import Lesion
from models.families.spec import FamilySpec, RoiStyle
from models.inference.preprocess import Box, crop, roi_input
from models.training.loop import augment_intensity, device_of

Tensor = torch.Tensor
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LesionSample:
    """One lesion: the full grayscale image, its ground-truth box, its label and where it came from."""

    record: Record
    image: npt.NDArray[np.uint8]
    box: Box
    label: int


def evaluation_input(roi: RoiStyle, sample: Lesion, size: int) -> npt.NDArray[np.float32]:
    """The network input of ``sample`` cut as serving cuts it (:func:`models.inference.preprocess.roi_input`)."""
    return roi_input(
        sample.image,
        sample.box,
        normalisation=roi.normalisation,
        padding=roi.padding,
        shortest_side=roi.shortest_side,
        size=size,
    )[1]


def training_input(roi: RoiStyle, sample: Lesion, size: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """One augmented training crop: the box shifted by up to 10 % and grown by the serving padding +-0.15, a random
    horizontal flip, gamma and speckle.

    Vertical flips stay out: posterior shadowing and enhancement lie below a
    lesion, never above it.
    """
    x, y, w, h = sample.box
    dx, dy = (rng.uniform(-0.1, 0.1, 2) * (w, h)).astype(int)
    padding = max(0.0, roi.padding + rng.uniform(-0.15, 0.15))
    box = roi.box((max(0, x + dx), max(0, y + dy), w, h), sample.image.shape[:2], padding)
    cut = crop(sample.image, box)
    if rng.random() < 0.5:
        cut = cut[:, ::-1]
    return roi.tensor(augment_intensity(np.ascontiguousarray(cut), rng), size)


def with_roi_padding(spec: FamilySpec, padding: float | None) -> FamilySpec:
    """``spec`` with its lesion box grown by ``padding`` (None: unchanged).

    Training, validation, the export and serving all cut the ROI through
    ``spec.roi``, so one override keeps them in step.

    Raises
    ------
    TrainingError
        For a padding outside 0-2.
    """
    if padding is None:
        return spec
    if not 0.0 <= padding <= 2.0:
        raise TrainingError(f"ROI padding {padding} is outside 0-2 (a fraction of the box added on every side)")
    return replace(spec, roi=replace(spec.roi, padding=padding))


def lesion_samples(records: list[Record], task: str) -> list[LesionSample]:
    """Every record with a lesion mask and a label for ``task``."""
    samples = []
    for record in records:
        label = record.malignant if task == "malignancy" else birads_high(record.birads)
        if label is None or record.mask_path is None:
            continue
        image = read_gray(record.image_path)
        box = mask_box(read_mask(record, image.shape))
        if box is not None:
            samples.append(LesionSample(record, image, box, int(label)))
    return samples


def split_samples(spec: FamilySpec, datasets: Path, holdout: str | None = None) -> dict[str, list[LesionSample]]:
    """Train / val / test samples; ``holdout`` drops one dataset from train and val (external validation)."""
    if spec.datasets == ("mias",):
        findings = mias_findings(datasets)
        return {
            split: [
                LesionSample(r, read_gray(r.image_path), box, int(r.malignant or 0))
                for r, box in findings
                if r.split == split
            ]
            for split in SPLITS
        }
    records = load_records(datasets, spec.datasets)
    if holdout:
        records = [r for r in records if r.dataset != holdout or r.split == "test"]
    return {split: lesion_samples([r for r in records if r.split == split], spec.task) for split in SPLITS}


def _batches(spec: FamilySpec, samples: Sequence[Lesion], size: int, batch: int) -> list[Tensor]:
    return [
        torch.from_numpy(np.concatenate([evaluation_input(spec.roi, s, size) for s in samples[start : start + batch]]))
        for start in range(0, len(samples), batch)
    ]


@torch.no_grad()
def positive_scores(
    spec: FamilySpec, model: nn.Module, samples: Sequence[Lesion], size: int, batch: int = 32
) -> npt.NDArray[np.float64]:
    """P(positive) for every sample, eval mode, serving-style ROI."""
    model.eval()
    device = device_of(model)
    scores: list[float] = []
    for x in _batches(spec, samples, size, batch):
        scores.extend(float(v) for v in spec.positive_probability(model, x.to(device)).float().cpu())
    return np.asarray(scores)


@torch.no_grad()
def network_outputs(
    spec: FamilySpec, model: nn.Module, samples: Sequence[Lesion], size: int, batch: int = 32
) -> npt.NDArray[np.float32]:
    """The network's second output (DLR embedding, CLDLR deep features) for every sample."""
    model.eval()
    device = device_of(model)
    rows = [model(x.to(device))[1].float().cpu().numpy() for x in _batches(spec, samples, size, batch)]
    return np.concatenate(rows).astype(np.float32)


def read_best(work: Path) -> dict[str, Any]:
    """The run's best validation checkpoint (``best.pt``): its ``model`` weights, ``epoch`` and ``score``."""
    checkpoint: dict[str, Any] = torch.load(work / "best.pt", map_location="cpu", weights_only=False)
    return checkpoint


def network_from(spec: FamilySpec, checkpoint: Mapping[str, Any]) -> nn.Module:
    """The family's network with a checkpoint's ``model`` weights, in eval mode."""
    model = spec.build()
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def load_best(spec: FamilySpec, work: Path) -> nn.Module:
    """The family's network at its best validation epoch (``best.pt``), in eval mode."""
    return network_from(spec, read_best(work))


class BalancedBatches:
    """Augmented training batches drawn with replacement, both classes equally often.

    Balanced sampling instead of a weighted loss: focal and cross-entropy
    losses then see both classes equally.
    """

    def __init__(self, spec: FamilySpec, train: Sequence[Lesion], batch_size: int, input_size: int) -> None:
        self.spec, self.train, self.batch_size, self.input_size = spec, train, batch_size, input_size
        self.labels = np.array([s.label for s in train])
        positives, negatives = max(1, int((self.labels == 1).sum())), max(1, int((self.labels == 0).sum()))
        self.weights = np.where(self.labels == 1, 0.5 / positives, 0.5 / negatives)
        self.steps_per_epoch = max(1, len(train) // batch_size)

    def draw(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.int64], Tensor, Tensor]:
        """Indices, augmented inputs and labels of one batch."""
        index = rng.choice(len(self.train), size=self.batch_size, p=self.weights)
        crops = [training_input(self.spec.roi, self.train[i], self.input_size, rng) for i in index]
        return index, torch.from_numpy(np.concatenate(crops)), torch.from_numpy(self.labels[index]).long()
