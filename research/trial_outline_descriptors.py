"""Trial, not a recipe: how much malignancy signal the lesion's outline carries, true against served.

    python research/trial_outline_descriptors.py [--datasets ../shared/datasets]

Fits the lexicon model's logistic regression (:func:`models.training.fit_lexicon.fit_logistic`)
on the descriptors of the training lesions' ground-truth outlines, then
prints, on the validation lesions:

- its AUC on the true outlines and on the served ones (the segmenter then
  refiner of ``--model-dir``, the bundled ones by default; the component ``breastai evaluate`` picks, the
  box's ellipse where none reaches the box), overall and per dataset;
- each outline descriptor's AUC on both, and the correlation of the two
  values across lesions; the true outline's convexity alone on each
  dataset's training lesions;
- the same model on true outlines sent through the refiner's close-up
  window at several sizes and back, to tell resolution from network;
- the irregularity descriptors of the true outlines blurred at several
  scales, to tell which scale carries the signal;
- with ``--served-training``, true against served on the training lesions,
  which the segmentation networks were fitted on.

Nothing is exported or served, and test is not touched. About half a
minute on two cores. ``docs/history.md``, "The readers' outlines carry what the
networks miss".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from models.evaluation.stats import auc
from models.inference.lexicon import DESCRIPTOR_NAMES, describe
from models.inference.preprocess import Box
from models.inference.refine import refiner_window
from models.inference.registry import BUNDLED_MODEL_DIR
from models.datasets import US_DATASETS, Record, load_records, read_gray, read_mask
from models.training.fit_lexicon import _labelled, fit_logistic, served_descriptors

OUTLINE_DESCRIPTORS = ("convexity", "solidity", "lobulations", "ellipse_mismatch", "orientation", "circularity", "radial_roughness")
LOWER_IS_SUSPICIOUS = frozenset({"convexity", "solidity", "circularity"})


def true_descriptors(lesions: list[tuple[Record, Box]], window_size: int | None = None, blur: float = 0.0) -> npt.NDArray[np.float64]:
    """Descriptors of each lesion's ground-truth outline.

    With ``window_size``, after a round trip through the refiner's window at
    that size; with ``blur``, after a Gaussian blur of the mask whose sigma is
    that fraction of the square root of the lesion's area, thresholded at one half.
    """
    rows = []
    for record, box in lesions:
        gray = read_gray(record.image_path)
        mask = read_mask(record, gray.shape).astype(bool)
        if blur > 0:
            mask = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), blur * float(np.sqrt(mask.sum()))) >= 0.5
        if window_size is not None:
            x, y, w, h = refiner_window(box, (int(gray.shape[0]), int(gray.shape[1])))
            small = cv2.resize(mask[y : y + h, x : x + w].astype(np.float32), (window_size, window_size), interpolation=cv2.INTER_LINEAR) >= 0.5
            mask = np.zeros_like(mask)
            mask[y : y + h, x : x + w] = cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
        rows.append(describe(gray, mask))
    return np.asarray(rows, dtype=np.float64)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--window-sizes", default="96,128,192", help="refiner window sizes for the round trip (comma-separated; empty: none)")
    parser.add_argument("--model-dir", type=Path, default=BUNDLED_MODEL_DIR, help="whose segmenter and refiner draw the served outlines")
    parser.add_argument("--blurs", default="0.02,0.05,0.1", help="blur the true outlines by these fractions of sqrt(area) (comma-separated; empty: none)")
    parser.add_argument("--served-training", action="store_true", help="also compare true and served outlines on the training lesions (about two minutes)")
    args = parser.parse_args(argv)
    records = load_records(Path(args.datasets), US_DATASETS)
    train, train_labels = _labelled([r for r in records if r.split == "train"], "malignancy")
    val, val_labels = _labelled([r for r in records if r.split == "val"], "malignancy")
    train_truth = true_descriptors(train)
    model = fit_logistic(train_truth, train_labels, 1.0)
    truth, served = true_descriptors(val), served_descriptors(args.model_dir, val)
    labels = np.asarray(val_labels)
    datasets = np.array([record.dataset for record, _ in val])
    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    on_truth = np.array([model.probability(row) for row in truth])
    on_served = np.array([model.probability(row) for row in served])
    say(f"lexicon fitted on true training outlines ({len(train)}), validation ({len(val)}): true {auc(labels, on_truth):.4f}, served {auc(labels, on_served):.4f}")
    for name in sorted(set(datasets)):
        chosen = datasets == name
        say(f"  {name} ({chosen.sum()}): true {auc(labels[chosen], on_truth[chosen]):.3f}, served {auc(labels[chosen], on_served[chosen]):.3f}")
    for name in OUTLINE_DESCRIPTORS:
        column = DESCRIPTOR_NAMES.index(name)
        sign = -1.0 if name in LOWER_IS_SUSPICIOUS else 1.0
        correlation = float(np.corrcoef(truth[:, column], served[:, column])[0, 1])
        say(
            f"  {name}: true {auc(labels, sign * truth[:, column]):.3f}, served {auc(labels, sign * served[:, column]):.3f}, "
            f"correlation {correlation:.2f}"
        )
    convexity = DESCRIPTOR_NAMES.index("convexity")
    train_sets, train_y = np.array([record.dataset for record, _ in train]), np.asarray(train_labels)
    for name in sorted(set(train_sets)):
        chosen = train_sets == name
        say(f"training lesions of {name} ({chosen.sum()}): true outline's convexity alone {auc(train_y[chosen], -train_truth[chosen, convexity]):.3f}")
    for size in (int(s) for s in args.window_sizes.split(",") if s):
        round_trip = true_descriptors(val, size)
        say(
            f"true outline through a {size} px window: lexicon {auc(labels, [model.probability(row) for row in round_trip]):.4f}, "
            f"convexity {auc(labels, -round_trip[:, convexity]):.3f}"
        )
    irregularity = [(name, DESCRIPTOR_NAMES.index(name), -1.0 if name in LOWER_IS_SUSPICIOUS else 1.0) for name in ("convexity", "solidity", "lobulations")]
    for blur in (float(s) for s in args.blurs.split(",") if s):
        blurred = true_descriptors(val, blur=blur)
        say(f"true outline blurred by {blur:g} sqrt(area): " + ", ".join(f"{name} {auc(labels, sign * blurred[:, column]):.3f}" for name, column, sign in irregularity))
    if args.served_training:
        served_train = served_descriptors(args.model_dir, train)
        for name, column, sign in irregularity:
            correlation = float(np.corrcoef(train_truth[:, column], served_train[:, column])[0, 1])
            say(
                f"training lesions, {name}: true {auc(train_y, sign * train_truth[:, column]):.3f}, "
                f"served {auc(train_y, sign * served_train[:, column]):.3f}, correlation {correlation:.2f}"
            )
    return lines


if __name__ == "__main__":
    main()
