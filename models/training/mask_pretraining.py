"""Mask pretraining: a family's network learns to outline lesions before it learns to grade them.

The papers start from ImageNet weights, which cannot be had here. SimCLR
(:mod:`models.training.pretrain`) was one stand-in and gave DL-U nothing.
This is the other: supervised pretraining on the task the development
sets label most densely, the lesion outline, whose margin is what the
BI-RADS lexicon grades.

- Network: the family's own network, unchanged. Forward hooks tap the end
  of each of its resolution stages (:func:`stage_modules`); a small
  feature-pyramid decoder (:class:`MaskDecoder`, Lin et al. 2017: 1x1
  laterals, top-down upsample-and-add, one 3x3 convolution) turns them into
  a mask at the finest stage's resolution. The decoder is dropped after
  pretraining, so ``best.pt`` loads into ``breastai train FAMILY --init``
  like a SimCLR checkpoint.
- Views: the same windows as SimCLR's (a lesion box grown 0-60 %, jittered,
  mirrored at random; a random square on images without a lesion, whose
  target is empty), cut and normalised as the family cuts its ROIs, with the
  mask cut from the same window.
- Loss: Dice + binary cross-entropy (``monai.losses.DiceCELoss``) against
  the window's mask resized to the input size.
- Data: training-split ultrasound images only (normal images included).
  The benign/malignant and BI-RADS labels are never read: ``best.pt`` is the
  epoch with the highest Dice on the validation images' lesion windows as
  the family cuts them for serving.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn import functional

from models.errors import TrainingError
from models.families.backbones import ResNetTrunk
from models.families.catalogue import family_specs
from models.families.cldlr.network import VGG11Radiomics
from models.families.dlr.network import DLRNet
from models.families.dlum.network import DLUMBranch
from models.families.mupnet.network import MUPNet
from models.families.spec import FamilySpec
from models.training.loop import (
    DEVICES,
    Checkpoints,
    augment_intensity,
    begin_run,
    device_of,
    epoch_batches,
    optimise_step,
    scheduled_step,
    to_training_device,
    training_device,
)
from models.training.pretrain import (
    PRETRAINING_DEFINING,
    PretrainConfig,
    PretrainImage,
    anchor_region,
    jittered_window,
    pretraining_images,
)

Tensor = torch.Tensor
#: Where runs before the decoder went into last.pt kept it (read on resume only).
LEGACY_DECODER_FILE = "mask_decoder.pt"
# The reference recipes that start from mask pretraining, and its epochs for each: each recipe declares them
# (FamilySpec.mask_pretraining_epochs). `make train-FAMILY` and `breastai train external` both read them from here.
REFERENCE_MASK_PRETRAINING: dict[str, int] = {
    name: spec.mask_pretraining_epochs for name, spec in family_specs().items() if spec.mask_pretraining_epochs
}
MASK_PRETRAINING_BATCH = 32
DEFAULT_MASK_PRETRAINING_EPOCHS = 20  # a family whose recipe starts from random weights, pretrained by hand


def mask_pretraining_recipe(family: str) -> tuple[int, int]:
    """Epochs and batch size of ``family``'s mask pretraining: its reference recipe's, else 20 epochs."""
    return REFERENCE_MASK_PRETRAINING.get(family, DEFAULT_MASK_PRETRAINING_EPOCHS), MASK_PRETRAINING_BATCH


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs end each resolution stage of a family's network, finest first.

    DLR (ResNet): the stem and the four residual stages. MUP-Net with one
    modality: the same of its ResNet-18 trunk. DL-U / DL-M: the five
    VGG19-style blocks (their outputs before max-pooling, which the
    deep-supervision heads also read). CLDLR (VGG11): the ReLU before each
    max-pooling and the last one.
    """
    if isinstance(model, DLRNet):
        return [model.trunk.stem, *model.trunk.stages]
    if isinstance(model, MUPNet) and model.modalities == 1:
        trunk = image_path(model)
        assert isinstance(trunk, ResNetTrunk)
        return [trunk.stem, *trunk.stages]
    if isinstance(model, DLUMBranch):
        return list(model.blocks)
    if isinstance(model, VGG11Radiomics):
        layers = list(model.features)
        ends = [layers[i - 1] for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
        return [*ends, layers[-1]]
    raise TrainingError(
        "mask pretraining knows the stages of DLR, DL-U/DL-M, CLDLR and one-modality MUP-Net networks, "
        f"not {type(model).__name__}"
    )


def image_path(model: nn.Module) -> nn.Module:
    """The part of ``model`` that takes a (B, 1, H, W) image through every tapped stage: MUP-Net's trunk, else the
    network.
    """
    if isinstance(model, MUPNet):
        trunk: nn.Module = model.trunks[0]
        return trunk
    return model


@contextmanager
def tapped(modules: list[nn.Module]) -> Iterator[list[Tensor]]:
    """Collect each module's output, in the order of ``modules``, while the block runs."""
    outputs: dict[int, Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, index=index: outputs.__setitem__(index, out))
        for index, module in enumerate(modules)
    ]
    taken: list[Tensor] = []
    try:
        yield taken
    finally:
        for handle in handles:
            handle.remove()
    taken.extend(outputs[index] for index in sorted(outputs))


class MaskDecoder(nn.Module):
    """Feature-pyramid decoder: stage features (finest first) in, mask logits at the finest stage's size out."""

    def __init__(self, channels: list[int], width: int = 32) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in channels)
        self.head = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, kernel_size=1),
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        merged: Tensor = self.lateral[-1](features[-1])
        for lateral, finer in zip(reversed(self.lateral[:-1]), reversed(features[:-1]), strict=False):
            merged = functional.interpolate(
                merged, size=finer.shape[-2:], mode="bilinear", align_corners=False
            ) + lateral(finer)
        logits: Tensor = self.head(merged)
        return logits


class MaskPretrainer(nn.Module):
    """The family's network plus the decoder: image in, mask logits at the input size out."""

    def __init__(self, network: nn.Module, input_size: int) -> None:
        super().__init__()
        self.network = network
        self.stages = stage_modules(network)
        was_training = network.training
        self.body = image_path(network)
        network.eval()
        with torch.no_grad(), tapped(self.stages) as features:
            self.body(torch.zeros(2, 1, input_size, input_size))
        network.train(was_training)
        self.decoder = MaskDecoder([int(f.shape[1]) for f in features])

    def forward(self, image: Tensor) -> Tensor:
        with tapped(self.stages) as features:
            self.body(image)
        return functional.interpolate(
            self.decoder(features), size=image.shape[-2:], mode="bilinear", align_corners=False
        )


def mask_window(
    item: PretrainImage,
    region: tuple[float, float, float, float],
    spec: FamilySpec,
    size: int,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """One augmented (image, mask) pair of ``region``, as ``spec`` cuts ROIs: shapes (1, 1, size, size) each."""
    box, mirrored = jittered_window(item, region, rng)
    image, mask = (
        np.ascontiguousarray(a[box[1] : box[1] + box[3], box[0] : box[0] + box[2]])
        for a in (item.image, item.lesion_mask())
    )
    if mirrored:
        image, mask = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    return spec.roi.tensor(augment_intensity(image, rng), size), mask_target(mask, size)


def mask_target(mask: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    """A 0/1 mask resized to the network's input, shape (1, 1, size, size)."""
    resized = cv2.resize(
        mask.astype(np.float32),
        (size, size),
        interpolation=cv2.INTER_AREA if min(mask.shape) >= size else cv2.INTER_LINEAR,
    )
    return (resized >= 0.5).astype(np.float32)[None, None]


@dataclass(frozen=True)
class ValidationWindows:
    """The validation images' lesion windows as the family cuts them for serving, with their masks."""

    images: Tensor
    masks: Tensor


def validation_windows(items: list[PretrainImage], spec: FamilySpec, size: int) -> ValidationWindows:
    """Stack the serving-padding windows of every validation image that has a lesion."""
    images, masks = [], []
    for item in items:
        if item.box is None:
            continue
        x, y, w, h = spec.roi.box(item.box, item.image.shape[:2])
        images.append(spec.roi.tensor(item.image[y : y + h, x : x + w], size))
        masks.append(mask_target(item.lesion_mask()[y : y + h, x : x + w], size))
    if not images:
        raise TrainingError("mask pretraining needs validation images with lesion masks to choose its checkpoint")
    return ValidationWindows(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(masks)))


def mean_dice(model: MaskPretrainer, windows: ValidationWindows, batch_size: int = 64) -> float:
    """Mean per-window Dice of the thresholded prediction (a window both empty counts 1)."""
    model.eval()
    device = device_of(model)
    scores = []
    with torch.no_grad():
        for start in range(0, len(windows.images), batch_size):
            predicted = (model(windows.images[start : start + batch_size].to(device)) > 0).float().flatten(1)
            truth = windows.masks[start : start + batch_size].to(device).flatten(1)
            overlap = (predicted * truth).sum(1)
            total = predicted.sum(1) + truth.sum(1)
            scores.append(torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total)))
    model.train()
    return float(torch.cat(scores).mean())


def pretrain_masks(
    spec: FamilySpec, config: PretrainConfig, images: list[PretrainImage], validation: list[PretrainImage]
) -> None:
    """Mask-pretraining epochs over ``images``; ``best.pt`` holds the network (without the decoder) of the best
    validation-Dice epoch.
    """
    device = training_device(config.device)
    model = to_training_device(MaskPretrainer(spec.build(), config.input_size), device)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    work = Path(config.work)
    checkpoints = Checkpoints(work)
    companions = {"decoder": model.decoder}
    start, best = checkpoints.resume(
        model.network, optimizer, companions, legacy_files={"decoder": LEGACY_DECODER_FILE}
    )
    windows = validation_windows(validation, spec, config.input_size)
    rng = np.random.default_rng(config.seed + start)
    steps_per_epoch = max(1, len(images) // config.batch_size)
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        losses = []
        for step, index in enumerate(epoch_batches(rng, len(images), config.batch_size)):
            batch = [images[i] for i in index]
            pairs = [mask_window(item, anchor_region(item, rng), spec, config.input_size, rng) for item in batch]
            x = torch.from_numpy(np.concatenate([image for image, _ in pairs])).to(device)
            target = torch.from_numpy(np.concatenate([mask for _, mask in pairs])).to(device)
            with scheduled_step(optimizer, config, device, (epoch, step, steps_per_epoch)):
                logits = model(x)
            losses.append(optimise_step(optimizer, loss_fn(logits.float(), target)))
        best, stop = checkpoints.end_epoch(
            model.network,
            optimizer,
            epoch,
            losses,
            "val_dice",
            mean_dice(model, windows),
            best,
            began,
            config,
            companions,
        )
        if stop:
            break


def main(argv: list[str] | None = None) -> None:
    """``breastai train pretrain FAMILY``: mask pretraining of a family's network, resumable in its run folder."""
    families = family_specs()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(name for name, spec in families.items() if spec.modality == "US"))
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work", default=None, help="checkpoint folder (default runs/pretrain-masks/FAMILY)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: the reference recipe's (REFERENCE_MASK_PRETRAINING)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"windows per step (default {MASK_PRETRAINING_BATCH})"
    )
    parser.add_argument("--holdout", default="", help="leave this dataset out entirely (external validation)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--input-size", type=int, help="default: the family's own input size")
    parser.add_argument(
        "--seed",
        type=int,
        help="default: the family recipe's seed (FamilySpec.seed), which its shipped model's pretraining used",
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=float("inf"))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: a CUDA GPU where torch sees one, else the CPU; checkpoints stay device-independent",
    )
    args = parser.parse_args(argv)
    spec = families[args.family]
    epochs, batch_size = mask_pretraining_recipe(spec.name)
    suffix = f"-without-{args.holdout}" if args.holdout else ""
    config = PretrainConfig(
        part=f"pretrain-masks-{spec.name}",
        datasets=args.datasets,
        work=args.work or f"runs/pretrain-masks/{spec.name}{suffix}",
        epochs=args.epochs or epochs,
        batch_size=args.batch_size or batch_size,
        learning_rate=args.learning_rate,
        input_size=args.input_size or spec.input_size,
        seed=args.seed if args.seed is not None else spec.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        device=args.device,
        family=spec.name,
        holdout=args.holdout,
    )
    begin_run(config, PRETRAINING_DEFINING)
    images = pretraining_images(Path(config.datasets), holdout=config.holdout)
    with_box = sum(i.box is not None for i in images)
    print(
        json.dumps({"pretrain": spec.name, "objective": "masks", "images": len(images), "with_lesion_box": with_box}),
        flush=True,
    )
    pretrain_masks(spec, config, images, pretraining_images(Path(config.datasets), ("val",), config.holdout))


if __name__ == "__main__":
    main()
