"""Train the walking-skeleton reference models: the US lesion segmenter and ROI classifier.

Usage::

    python -m models.training.train_reference segmenter --datasets ../shared/datasets
    python -m models.training.train_reference classifier --datasets ../shared/datasets
    python -m models.training.export_reference --datasets ../shared/datasets

Each part checkpoints after every epoch into ``--work`` (resumed on
restart), logs one JSON line per epoch, and keeps the checkpoint with the
best validation score. Seeded; the configuration is saved beside the
checkpoints. No pretrained weights exist here: networks start from scratch.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from monai.networks.nets.basic_unet import UpCat
from torch import nn

from models.datasets import Record, load_records, mask_box, read_gray, read_mask
from models.evaluation.stats import auc, dice
from models.families.segmentation.network import (
    lesion_refiner,
    lesion_segmenter,
    recalibrate_batch_norm,
    roi_classifier,
)
from models.inference.preprocess import crop, expand_box, standardise
from models.inference.refine import refiner_window
from models.training.loop import (
    DEVICES,
    Checkpoints,
    augment_geometry,
    augment_intensity,
    bce_soft_dice,
    begin_run,
    cosine_lr,
    device_of,
    epoch_batches,
    optimise_step,
    scheduled_step,
    to_training_device,
    training_device,
)
from models.training.run_config import DEFAULT_SEED, TrainConfig

# --------------------------------------------------------------------------- segmenter


def _segmentation_arrays(records: list[Record], size: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    images = np.zeros((len(records), size, size), dtype=np.uint8)
    masks = np.zeros((len(records), size, size), dtype=np.uint8)
    for i, record in enumerate(records):
        gray = read_gray(record.image_path)
        mask = read_mask(record, gray.shape)
        images[i] = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
        masks[i] = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return images, masks


def train_segmenter(config: TrainConfig) -> None:
    """Dice + BCE training of the UNet on every US image (normal images teach 'no lesion')."""
    records = load_records(Path(config.datasets))
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    size = config.input_size
    train_x, train_y = _segmentation_arrays(train, size)
    val_x, val_y = _segmentation_arrays(val, size)
    _fit_segmentation(
        lesion_segmenter(),
        config,
        len(train),
        lambda i, _rng: (train_x[i], train_y[i]),
        lambda model: _validate_segmenter(model, train_x, val_x, val_y, size),
        "val_dice_lesion_images",
        channels_last=True,
    )


def _fit_segmentation(
    model: nn.Module,
    config: TrainConfig,
    count: int,
    pair: Callable[[int, np.random.Generator], tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]],
    validate: Callable[[nn.Module], float],
    metric: str,
    channels_last: bool,
) -> None:
    """Dice + BCE epochs over ``count`` (image, mask) pairs, each augmented, checkpointed and scored by ``validate``.

    ``pair(i, rng)`` gives the i-th training image and mask at the input
    size (the refiner's are freshly jittered windows); flips, small affine
    warps, gamma and speckle are added here.
    """
    size = config.input_size
    device = training_device(config.device)
    to_training_device(model, device, channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    checkpoints = Checkpoints(Path(config.work))
    start, best = checkpoints.resume(model, optimizer)
    rng = np.random.default_rng(config.seed + start)
    steps_per_epoch = max(1, count // config.batch_size)
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        losses = []
        for step, index in enumerate(epoch_batches(rng, count, config.batch_size)):
            xs, ys = [], []
            for i in index:
                image, mask = augment_geometry(*pair(int(i), rng), rng)
                assert mask is not None
                xs.append(standardise(augment_intensity(image, rng), size)[0])
                ys.append(mask[None].astype(np.float32))
            x, y = torch.from_numpy(np.stack(xs)).to(device), torch.from_numpy(np.stack(ys)).to(device)
            with scheduled_step(optimizer, config, device, (epoch, step, steps_per_epoch)):
                logits = model(x)
            losses.append(optimise_step(optimizer, bce_soft_dice(logits.float(), y)))
        best, stop = checkpoints.end_epoch(
            model, optimizer, epoch, losses, metric, validate(model), best, began, config
        )
        if stop:
            break


@torch.no_grad()
def _validate_segmenter(
    model: nn.Module,
    train_images: npt.NDArray[np.uint8],
    images: npt.NDArray[np.uint8],
    masks: npt.NDArray[np.uint8],
    size: int,
) -> float:
    """Mean Dice on validation lesion images, after batch-norm recalibration on (a sample of) training images.

    Recalibrating a copy keeps the training state untouched while scoring
    the model exactly as it will be exported.
    """
    model = copy.deepcopy(model)
    sample = train_images[:: max(1, len(train_images) // 256)]
    recalibrate_batch_norm(
        model,
        (
            torch.from_numpy(np.concatenate([standardise(i, size) for i in sample[k : k + 32]]))
            for k in range(0, len(sample), 32)
        ),
    )
    model.eval()
    scores = []
    for image, mask in zip(images, masks, strict=False):
        if mask.sum() == 0:
            continue
        logits = model(torch.from_numpy(standardise(image, size)).to(device_of(model)))[0, 0].float().cpu().numpy()
        scores.append(dice(logits >= 0, mask.astype(bool)))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- refiner


@dataclass(frozen=True)
class LesionImage:
    image: npt.NDArray[np.uint8]
    mask: npt.NDArray[np.uint8]
    box: tuple[int, int, int, int]


def lesion_images(records: list[Record]) -> list[LesionImage]:
    """Every lesion image at full resolution with its mask and the box of its largest region."""
    lesions = []
    for record in records:
        if record.mask_path is None or record.malignant is None:
            continue
        gray = read_gray(record.image_path)
        mask = read_mask(record, gray.shape)
        box = mask_box(mask)
        if box is not None:
            lesions.append(LesionImage(gray, mask, box))
    return lesions


def refiner_pair(
    lesion: LesionImage, size: int, rng: np.random.Generator | None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """A close-up window around the lesion and its mask, both ``size`` x ``size``.

    With ``rng`` the window is jittered the way a coarse box misses the
    lesion (grown by 10-45 % per side, each edge shifted by up to 10 % of
    the box); without it, the serving rule (:data:`models.inference.refine.WINDOW_EXPAND`).
    """
    x, y, w, h = lesion.box
    if rng is not None:
        x0 = x + rng.normal(0, 0.05) * w
        y0 = y + rng.normal(0, 0.05) * h
        x1 = x + w + rng.normal(0, 0.05) * w
        y1 = y + h + rng.normal(0, 0.05) * h
        box = (round(x0), round(y0), max(2, round(x1 - x0)), max(2, round(y1 - y0)))
        window = expand_box(box, lesion.image.shape[:2], float(rng.uniform(0.10, 0.45)))
    else:
        window = refiner_window(lesion.box, lesion.image.shape[:2])
    image, mask = crop(lesion.image, window), crop(lesion.mask, window)
    interpolation = cv2.INTER_AREA if min(image.shape) >= size else cv2.INTER_LINEAR
    resized = np.asarray(cv2.resize(image, (size, size), interpolation=interpolation), dtype=np.uint8)
    target = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5
    return resized, target.astype(np.uint8)


def without_zero_width_padding(network: nn.Module, input_size: int) -> nn.Module:
    """``network`` (a MONAI BasicUNet) with its decoder's edge padding switched off where it can never pad anything.

    Each decoder stage replicate-pads its upsampled features by one pixel
    where an odd side lost a row to pooling; at a side divisible by 16 (four
    poolings) none is lost, but the pad still copies every feature map, in
    the forward pass and the backward. Switching it off leaves the outputs
    identical. Training only: the exported graph keeps MONAI's default.
    """
    if input_size % 16 == 0:
        for stage in network.modules():
            if isinstance(stage, UpCat):
                stage.is_pad = False
    return network


def train_refiner(config: TrainConfig) -> None:
    """Dice + BCE training of the close-up UNet on jittered windows around every training lesion."""
    records = load_records(Path(config.datasets))
    train = lesion_images([r for r in records if r.split == "train"])
    val = [
        refiner_pair(lesion, config.input_size, None)
        for lesion in lesion_images([r for r in records if r.split == "val"])
    ]
    val_windows, val_masks = np.stack([w for w, _ in val]), np.stack([m for _, m in val])
    # Batch-norm statistics are recalibrated on training windows (serving rule), never on validation ones.
    calibration = np.stack(
        [refiner_pair(lesion, config.input_size, None)[0] for lesion in train[:: max(1, len(train) // 256)]]
    )
    _fit_segmentation(
        without_zero_width_padding(lesion_refiner(), config.input_size),
        config,
        len(train),
        lambda i, rng: refiner_pair(train[i], config.input_size, rng),
        lambda model: _validate_segmenter(model, calibration, val_windows, val_masks, config.input_size),
        "val_dice_windows",
        channels_last=False,  # instance norm is slower in NHWC (see to_training_device)
    )


# --------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class RoiSample:
    image: npt.NDArray[np.uint8]
    box: tuple[int, int, int, int]
    malignant: int


def roi_samples(records: list[Record]) -> list[RoiSample]:
    """Full image + ground-truth lesion box for every lesion image with a known pathology."""
    samples = []
    for record in records:
        if record.malignant is None:
            continue
        gray = read_gray(record.image_path)
        box = mask_box(read_mask(record, gray.shape))
        if box is not None:
            samples.append(RoiSample(gray, box, record.malignant))
    return samples


def jittered_roi(sample: RoiSample, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """ROI crop with the box expanded 5-40 % and shifted a little, as a segmenter's box would vary."""
    x, y, w, h = sample.box
    dx, dy = (rng.uniform(-0.1, 0.1, 2) * (w, h)).astype(int)
    box = expand_box((max(0, x + dx), max(0, y + dy), w, h), sample.image.shape[:2], rng.uniform(0.05, 0.4))
    roi = crop(sample.image, box)
    return roi[:, ::-1] if rng.random() < 0.5 else roi


def train_classifier(config: TrainConfig) -> None:
    """Weighted cross-entropy training of the ResNet-18 ROI classifier (benign vs malignant)."""
    records = load_records(Path(config.datasets))
    train = roi_samples([r for r in records if r.split == "train"])
    val = roi_samples([r for r in records if r.split == "val"])
    device = training_device(config.device)
    model = to_training_device(roi_classifier(), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    checkpoints = Checkpoints(Path(config.work))
    start, best = checkpoints.resume(model, optimizer)
    rng = np.random.default_rng(config.seed + start)
    labels = np.array([s.malignant for s in train])
    weights = torch.tensor(
        [len(labels) / (2 * (labels == 0).sum()), len(labels) / (2 * (labels == 1).sum())], dtype=torch.float32
    )
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
    steps_per_epoch = max(1, len(train) // config.batch_size)
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        losses = []
        for step, index in enumerate(epoch_batches(rng, len(train), config.batch_size)):
            x = torch.from_numpy(
                np.concatenate(
                    [standardise(augment_intensity(jittered_roi(train[i], rng), rng), config.input_size) for i in index]
                )
            ).to(device)
            y = torch.from_numpy(labels[index]).long().to(device)
            cosine_lr(
                optimizer,
                config.learning_rate,
                epoch * steps_per_epoch + step,
                config.epochs * steps_per_epoch,
                steps_per_epoch,
            )
            logits, _ = model(x)
            losses.append(optimise_step(optimizer, loss_fn(logits, y)))
        score = _validate_classifier(model, val, config.input_size)
        best, stop = checkpoints.end_epoch(model, optimizer, epoch, losses, "val_auc", score, best, began, config)
        if stop:
            break


@torch.no_grad()
def _validate_classifier(model: nn.Module, samples: list[RoiSample], size: int) -> float:
    model.eval()
    scores = []
    for sample in samples:
        roi = crop(sample.image, expand_box(sample.box, sample.image.shape[:2], 0.2))
        logits, _ = model(torch.from_numpy(standardise(roi, size)).to(device_of(model)))
        scores.append(float(torch.softmax(logits.float(), 1)[0, 1]))
    return auc([s.malignant for s in samples], scores)


DEFAULTS = {
    "segmenter": {"epochs": 9, "batch_size": 16, "learning_rate": 2e-3, "input_size": 160},
    "refiner": {"epochs": 12, "batch_size": 16, "learning_rate": 2e-3, "input_size": 128},
    "classifier": {"epochs": 18, "batch_size": 32, "learning_rate": 1e-3, "input_size": 128},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(DEFAULTS))
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work", default=None, help="checkpoint folder (default runs/reference/PART)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument(
        "--max-minutes", type=float, default=float("inf"), help="stop after the epoch that crosses this"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help=(
            "bfloat16 autocast for forward passes on the training device (about 1.6x faster on CPUs with AVX512-BF16; "
            "on a GPU, one with native bf16; the refiner was trained with it)"
        ),
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: a CUDA GPU where torch sees one, else the CPU; checkpoints and the export stay device-independent",
    )
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.part]
    config = TrainConfig(
        part=args.part,
        datasets=args.datasets,
        work=args.work or f"runs/reference/{args.part}",
        epochs=args.epochs or int(defaults["epochs"]),
        batch_size=args.batch_size or int(defaults["batch_size"]),
        learning_rate=args.learning_rate or float(defaults["learning_rate"]),
        input_size=args.input_size or int(defaults["input_size"]),
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        device=args.device,
    )
    begin_run(config)
    {"segmenter": train_segmenter, "refiner": train_refiner, "classifier": train_classifier}[config.part](config)


if __name__ == "__main__":
    main()
