"""Trial, not a recipe: DL-U's network given the lesion's outline as a second input channel.

    python research/trial_mask_channel.py --seed 20261121 --bf16          # the trial
    python research/trial_mask_channel.py --seed 20261121 --bf16 --control  # the same seed, DL-U's recipe unchanged

Every family sees the lesion only through its box: the outline the
segmenter and refiner draw is served, but no network reads it, and margin
and shape are what a reader's malignancy call rests on most. This trial
trains DL-U's network (its recipe: 40 epochs, AdamW 1e-3, batch 16, 96 px,
focal loss on all five heads, DL-UM's ROI) with two input channels: the
min-max ROI as DL-U reads it, and the lesion mask cut and resized with the
same box (0-1), the training crops' shift, padding and flip applied to both.
Training reads the ground-truth masks. Validation is scored in PyTorch on
the ground-truth box with the ground-truth mask: the most the outline can
give, since a served outline (Dice about 0.88 on BUS-BRA) can only give
less. ``--control`` trains the unchanged DL-U recipe with the same seed,
here and side by side, as the rule asks.

``--train-served P`` lets each training crop read the bundled
segmentation's outline of that training image instead of the true one with
probability P; ``--score-only --served-masks`` scores a finished run on
validation with the served outlines (the component ``breastai evaluate``
picks for a lesion).

Fixed before training: unless the mask-channel network beats its same-seed
control by 0.01 or more on validation (all 176 lesions), first with the
true outline and then with the served one, the lever is dropped without
building a served path. It passed the first (0.958 against 0.923) and not
the second (0.924 at best): ``docs/history.md``, "The readers' outlines
carry what the networks miss". Nothing is exported or served, and test is
not touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from models.evaluation.stats import auc
from models.families.dlum import network as dlum
from models.inference.preprocess import crop
from models.training import train_family
from models.training.loop import augment_intensity
from models.datasets import read_mask


def mask_tensor(mask: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    """A 0/1 mask crop as a (1, 1, size, size) channel, area-averaged where it shrinks."""
    interpolation = cv2.INTER_AREA if min(mask.shape) >= size else cv2.INTER_LINEAR
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=interpolation)
    return np.asarray(resized, dtype=np.float32)[None, None]


@dataclass(frozen=True)
class MaskChannelRoi(train_family.RoiStyle):
    """DL-UM's ROI with the lesion mask, cut by the same box, as a second channel."""

    masks: dict[str, npt.NDArray[np.uint8]] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # Served outlines of the training images: each training crop reads one of them in place of the true outline with
    # probability ``served_fraction``, so that the network learns the outlines it will be given, not only the readers'.
    training_served: dict[str, npt.NDArray[np.uint8]] = field(default_factory=dict, compare=False, hash=False, repr=False)
    served_fraction: float = 0.0

    def _mask(self, sample: train_family.LesionSample) -> npt.NDArray[np.uint8]:
        key = sample.record.image_id
        if key not in self.masks:
            self.masks[key] = read_mask(sample.record, sample.image.shape[:2])
        return self.masks[key]

    def evaluation_input(self, sample: train_family.LesionSample, size: int) -> npt.NDArray[np.float32]:
        box = self.box(sample.box, sample.image.shape[:2])
        return np.concatenate([self.tensor(crop(sample.image, box), size), mask_tensor(crop(self._mask(sample), box), size)], axis=1)

    def training_input(self, sample: train_family.LesionSample, size: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
        """The ``standard`` augmentation, drawing the random numbers in the same order, with the mask moved alike."""
        if self.augmentation != "standard" or self.square:
            raise ValueError("the trial implements the standard augmentation only")
        x, y, w, h = sample.box
        dx, dy = (rng.uniform(-0.1, 0.1, 2) * (w, h)).astype(int)
        padding = max(0.0, self.padding + rng.uniform(-0.15, 0.15))
        box = self.box((max(0, x + dx), max(0, y + dy), w, h), sample.image.shape[:2], padding)
        outline = self._mask(sample)
        if self.served_fraction > 0 and rng.random() < self.served_fraction:
            outline = self.training_served[sample.record.image_id]
        roi, mask = crop(sample.image, box), crop(outline, box)
        if rng.random() < 0.5:
            roi, mask = roi[:, ::-1], mask[:, ::-1]
        roi = augment_intensity(np.ascontiguousarray(roi), rng)
        return np.concatenate([self.tensor(roi, size), mask_tensor(np.ascontiguousarray(mask), size)], axis=1)


def served_masks(samples: list[train_family.LesionSample]) -> dict[str, npt.NDArray[np.uint8]]:
    """Each sample's lesion as the bundled segmenter and refiner outline it, picked as ``breastai evaluate`` picks it.

    The served component with the most pixels in the true box; where none
    reaches it, the box's ellipse, as the lexicon model falls back.
    """
    from models.evaluation.command import served_mask_at
    from models.inference.lexicon import box_ellipse
    from models.inference.pipeline import load_refiner, load_segmenter, segment_lesions

    segmenter, entry = load_segmenter()
    refiner = load_refiner()
    masks = {}
    for sample in samples:
        shape = (int(sample.image.shape[0]), int(sample.image.shape[1]))
        mask = served_mask_at(segment_lesions(segmenter, entry, refiner, sample.image), sample.box)
        masks[sample.record.image_id] = (mask if mask is not None else box_ellipse(sample.box, shape)).astype(np.uint8)
    return masks


def main(argv: list[str] | None = None) -> float:
    """Train (unless ``--score-only``) and score one run; returns its validation AUC."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=train_family.FAMILIES["dl_u"].seed)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work-root", default="runs/trial")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, help="default: DL-U's recipe")
    parser.add_argument("--control", action="store_true", help="DL-U's recipe unchanged, one input channel")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument(
        "--train-served", type=float, default=0.0,
        help="probability that a training crop reads the bundled segmentation's outline instead of the true one (0: never)",
    )
    parser.add_argument("--served-masks", action="store_true", help="score validation with the bundled segmenter and refiner's outlines instead of the true ones")
    args = parser.parse_args(argv)
    base = train_family.FAMILIES["dl_u"]
    name = "dl_u_control" if args.control else "dl_u_mask"
    spec = base if args.control else dataclasses.replace(
        base, name=name, build=lambda: dlum.DLUMBranch(in_channels=2, width=train_family.DLUM_WIDTH),
        roi=MaskChannelRoi(**{f.name: getattr(base.roi, f.name) for f in dataclasses.fields(base.roi)}, served_fraction=args.train_served),
    )
    if args.train_served > 0:
        name = f"{name}_served{args.train_served:g}"
    spec = dataclasses.replace(spec, name=name)
    work = Path(args.work_root) / f"{name}_{args.seed}"
    train_family.FAMILIES[name] = spec
    try:
        if args.train_served > 0 and not args.score_only and isinstance(spec.roi, MaskChannelRoi):
            spec.roi.training_served.update(served_masks(train_family.split_samples(spec, Path(args.datasets))["train"]))
        if not args.score_only:
            train_family.main(
                [name, "--stage", "network", "--datasets", args.datasets, "--threads", str(args.threads), "--seed", str(args.seed),
                 "--work", str(work), *(["--bf16"] if args.bf16 else []), *(["--epochs", str(args.epochs)] if args.epochs else [])]
            )
        samples = train_family.split_samples(spec, Path(args.datasets))["val"]
        if args.served_masks and isinstance(spec.roi, MaskChannelRoi):
            spec.roi.masks.update(served_masks(samples))
        size = int(json.loads((work / "config.json").read_text())["input_size"])
        scores = train_family.positive_scores(spec, train_family.load_best(spec, work), samples, size)
    finally:
        del train_family.FAMILIES[name]
    np.save(work / ("val_scores_served_masks.npy" if args.served_masks else "val_scores.npy"), scores)
    labels = np.array([s.label for s in samples])
    busbra = np.array([s.record.dataset == "busbra" for s in samples])
    result = auc(labels, scores)
    outline = " (served outlines)" if args.served_masks and not args.control else ""
    print(f"{name}{outline} seed {args.seed}: validation AUC {result:.4f} (n={len(samples)}), BUS-BRA {auc(labels[busbra], scores[busbra]):.4f} (n={busbra.sum()})")
    return result


if __name__ == "__main__":
    main()
