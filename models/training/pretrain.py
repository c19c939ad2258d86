"""Pretraining of a family's network on ultrasound images: SimCLR here, lesion outlines in ``mask_pretraining``.

The papers start from ImageNet weights, which cannot be had here. This
recipe is the issue's suggested stand-in: contrastive pretraining of the
family's own network on every ultrasound image of the training split
(normal images included), then ``breastai train FAMILY --init
runs/pretrain/FAMILY/best.pt`` fine-tunes it with its family's recipe.

- Views (SimCLR, Chen et al. 2020): each image gives one anchor region, a
  lesion box grown by 0-60 % where the image has a mask (the masks place
  the region, the labels are never read) and a random square of 30-80 % of
  the shorter side otherwise; each of the two views jitters that region
  (shift +-20 %, scale 0.75-1.3), flips it at random, and changes gamma and
  speckle, then is cut and normalised exactly as the family cuts its ROIs.
- Loss: NT-Xent (``monai.losses.ContrastiveLoss``) on a two-layer projection
  of the network's pooled features (its second output), which is dropped
  after pretraining.
- Images of the validation and test splits are left out: validation later
  picks the fine-tuned checkpoint and the operating point, and the test
  numbers stay those of images no stage of training has seen.
- Checkpoints: ``best.pt`` by a linear probe's validation AUC (logistic
  regression on the frozen pooled features of the training lesions), which
  is the only place labels enter, and only to choose the epoch.

``--objective masks`` pretrains on the lesion outlines instead
(:mod:`models.training.mask_pretraining`); its checkpoint starts a family
the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from monai.losses import ContrastiveLoss
from torch import nn

from models.evaluation.stats import auc
from models.inference.preprocess import Box, crop
from models.training.data import US_DATASETS, load_records, mask_box, read_gray, read_mask
from models.training.loop import (
    DEVICES,
    Checkpoints,
    augment_intensity,
    check_resumable,
    cosine_lr,
    epoch_batches,
    mixed_precision,
    optimise_step,
    seed_everything,
    to_training_device,
    training_device,
)
from models.training.train_family import FAMILIES, FamilySpec, LesionSample, lesion_samples, network_outputs
from models.training.train_reference import TrainConfig

Tensor = torch.Tensor


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
    family: str
    temperature: float | None  # SimCLR's; None for mask pretraining
    objective: str = "simclr"  # or "masks" (models.training.mask_pretraining)
    holdout: str = ""  # a dataset left out entirely (external validation, models.training.external)


# Settings that make a different pretrained network (a run resumes only under the same ones; epochs may grow).
PRETRAINING_DEFINING = ("family", "objective", "holdout", "seed", "batch_size", "learning_rate", "input_size", "temperature")


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
    """Centre x, centre y, width, height of the region both views are cut around."""
    rows, cols = item.image.shape[:2]
    if item.box is not None:
        x, y, w, h = item.box
        grow = 1.0 + rng.uniform(0.0, 0.6)
        return x + w / 2, y + h / 2, w * grow, h * grow
    side = rng.uniform(0.3, 0.8) * min(rows, cols)
    return rng.uniform(side / 2, cols - side / 2), rng.uniform(side / 2, rows - side / 2), side, side


def jittered_window(item: PretrainImage, region: tuple[float, float, float, float], rng: np.random.Generator) -> tuple[Box, bool]:
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


def contrastive_view(item: PretrainImage, region: tuple[float, float, float, float], spec: FamilySpec, size: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """One augmented view of ``region``, cut and normalised as ``spec`` cuts its ROIs: shape (1, 1, size, size)."""
    box, mirrored = jittered_window(item, region, rng)
    roi = crop(item.image, box)
    if mirrored:
        roi = roi[:, ::-1]
    return spec.roi.tensor(augment_intensity(np.ascontiguousarray(roi), rng), size)


class ProjectionHead(nn.Module):
    """SimCLR's two-layer MLP from pooled features to the space the loss compares in."""

    def __init__(self, features: int, hidden: int = 256, out: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(x)
        return out


def pooled_width(model: nn.Module, size: int) -> int:
    """Width of the network's pooled features (its second output)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model(torch.zeros(2, 1, size, size))
    model.train(was_training)
    if not isinstance(output, tuple) or output[1].dim() != 2:
        raise SystemExit("pretraining needs a family whose network returns pooled features as its second output (dlr_lh, dlr_bm, cldlr, dl_u, dl_m)")
    return int(output[1].shape[1])


def linear_probe_auc(spec: FamilySpec, model: nn.Module, train: list[LesionSample], val: list[LesionSample], size: int) -> float:
    """Validation AUC of a logistic regression on the frozen pooled features of the training lesions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features = {name: network_outputs(spec, model, items, size) for name, items in (("train", train), ("val", val))}
    scaler = StandardScaler().fit(features["train"])
    probe = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(features["train"]), [s.label for s in train])
    return auc([s.label for s in val], probe.predict_proba(scaler.transform(features["val"]))[:, 1])


def pretrain(spec: FamilySpec, config: PretrainConfig, images: list[PretrainImage], probe: dict[str, list[LesionSample]]) -> None:
    """SimCLR epochs over ``images``; ``best.pt`` holds the network (without the projection) of the best probe epoch."""
    if config.temperature is None:
        raise ValueError("SimCLR needs a temperature")
    device = training_device(config.device)
    model = spec.build()
    head = ProjectionHead(pooled_width(model, config.input_size))
    to_training_device(model, device)
    to_training_device(head, device)
    loss_fn = ContrastiveLoss(temperature=config.temperature)
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-4)
    checkpoints = Checkpoints(Path(config.work))
    companions = {"projection_head": head}
    # Runs before the head went into last.pt kept it in projection.pt.
    start, best = checkpoints.resume(model, optimizer, companions, legacy_files={"projection_head": "projection.pt"})
    rng = np.random.default_rng(config.seed + start)
    steps_per_epoch = max(1, len(images) // config.batch_size)
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        head.train()
        losses = []
        for step, index in enumerate(epoch_batches(rng, len(images), config.batch_size)):
            batch = [images[i] for i in index]
            regions = [anchor_region(item, rng) for item in batch]
            first = torch.from_numpy(np.concatenate([contrastive_view(item, r, spec, config.input_size, rng) for item, r in zip(batch, regions)])).to(device)
            second = torch.from_numpy(np.concatenate([contrastive_view(item, r, spec, config.input_size, rng) for item, r in zip(batch, regions)])).to(device)
            cosine_lr(optimizer, config.learning_rate, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch, steps_per_epoch)
            with mixed_precision(device, config.bf16):
                projected = head(model(torch.cat([first, second]))[1])
            left, right = projected.float().chunk(2)
            losses.append(optimise_step(optimizer, loss_fn(left, right)))
        score = linear_probe_auc(spec, model, probe["train"], probe["val"], config.input_size)
        best, stop = checkpoints.end_epoch(model, optimizer, epoch, losses, "probe_val_auc", score, best, began, config, companions)
        if stop:
            break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(name for name, spec in FAMILIES.items() if spec.datasets != ("mias",)),
                        help="mupnet: --objective masks only (SimCLR reads a pooled feature MUP-Net does not have)")
    parser.add_argument("--objective", choices=("simclr", "masks"), default="simclr",
                        help="simclr: contrastive, labels unused (this module); masks: learn the lesion outlines (models.training.mask_pretraining)")
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work", default=None, help="checkpoint folder (default runs/pretrain/FAMILY, runs/pretrain-masks/FAMILY)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 20, or the reference recipe's for --objective masks (REFERENCE_MASK_PRETRAINING)")
    parser.add_argument("--batch-size", type=int, default=None, help="SimCLR: pairs per step, the loss sees 2x this many views (default 64); masks: windows per step (default 32)")
    parser.add_argument("--holdout", default="", help="leave this dataset out entirely (external validation)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--input-size", type=int, help="default: the family's own input size")
    parser.add_argument("--temperature", type=float, default=0.2, help="SimCLR only")
    parser.add_argument("--seed", type=int, help="default: the family recipe's seed (FamilySpec.seed), which its shipped model's pretraining used")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=float("inf"))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: a CUDA GPU where torch sees one, else the CPU; checkpoints and the export stay device-independent")
    args = parser.parse_args(argv)
    spec = FAMILIES[args.family]
    masks = args.objective == "masks"
    if spec.name == "mupnet" and not masks:
        parser.error("SimCLR pretraining reads the network's pooled features, which MUP-Net does not have: use --objective masks")
    epochs, batch_size = 20, 64
    if masks:
        from models.training.mask_pretraining import mask_pretraining_recipe  # imported here: it builds on this module

        epochs, batch_size = mask_pretraining_recipe(spec.name)
    suffix = f"-without-{args.holdout}" if args.holdout else ""
    config = PretrainConfig(
        part=f"pretrain-{args.objective}-{spec.name}" if masks else f"pretrain-{spec.name}",
        datasets=args.datasets,
        work=args.work or f"runs/pretrain{'-masks' if masks else ''}/{spec.name}{suffix}",
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
        temperature=None if masks else args.temperature,
        objective=args.objective,
        holdout=args.holdout,
    )
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    check_resumable(Path(config.work), asdict(config), PRETRAINING_DEFINING)
    Path(config.work).mkdir(parents=True, exist_ok=True)
    (Path(config.work) / "config.json").write_text(json.dumps(asdict(config), indent=2))
    images = pretraining_images(Path(config.datasets), holdout=config.holdout)
    print(json.dumps({"pretrain": spec.name, "objective": config.objective, "images": len(images), "with_lesion_box": sum(i.box is not None for i in images)}), flush=True)
    if masks:
        from models.training.mask_pretraining import pretrain_masks

        pretrain_masks(spec, config, images, pretraining_images(Path(config.datasets), ("val",), config.holdout))
        return
    records = [r for r in load_records(Path(config.datasets), spec.datasets) if r.split in ("train", "val") and r.dataset != config.holdout]
    probe = {split: lesion_samples([r for r in records if r.split == split], spec.task) for split in ("train", "val")}
    pretrain(spec, config, images, probe)


if __name__ == "__main__":
    main()
