"""Fit the lexicon-descriptor model (:mod:`models.inference.lexicon`) of a model folder.

``python -m models.training.fit_lexicon --datasets ../shared/datasets``
(or ``breastai train lexicon``) outlines every training lesion with the
folder's own segmentation as served (segmenter, then refiner), measures
the descriptors on that outline, and fits an L2-regularised logistic
regression on them (scikit-learn); the operating point is Youden's J on
the validation split, like every family's. Writes ``<role>.json`` and the
manifest entry, which pins the sha256 of the segmentation stages the
descriptors were read with: a folder whose segmenter or refiner changed
refuses the stale model at start-up.

Needs scikit-learn (the train extra) but no torch: run it again whenever
the segmenter or refiner is retrained.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.datasets import US_DATASETS, Record, birads_high, load_records, read_gray
from models.errors import TrainingError
from models.evaluation.command import lesion_boxes, served_mask_at
from models.evaluation.stats import auc, youden_threshold
from models.inference.lexicon import DESCRIPTOR_NAMES, LogisticModel, box_ellipse, describe
from models.inference.manifest import ModelKind
from models.inference.pipeline import SEGMENTATION_ROLES, load_refiner, load_segmenter, segment_lesions
from models.inference.preprocess import Box
from models.inference.registry import BUNDLED_MODEL_DIR, ModelEntry, merge_into_manifest, read_manifest, sha256_of

VERSION = "0.5.0"
TASKS = {
    "malignancy": ("lexicon", "BreastAI-US-Lexicon-Logistic"),
    "birads_high": ("lexicon_lh", "BreastAI-US-Lexicon-Logistic-LH"),
}


def served_descriptors(model_dir: Path, lesions: Sequence[tuple[Record, Box]]) -> npt.NDArray[np.float64]:
    """Descriptors of each lesion's served outline (the component over its box; the box's ellipse when none)."""
    segmenter, entry = load_segmenter(model_dir)
    refiner = load_refiner(model_dir)
    rows = []
    for record, box in lesions:
        gray = read_gray(record.image_path)
        mask = served_mask_at(segment_lesions(segmenter, entry, refiner, gray), box)
        rows.append(
            describe(gray, mask if mask is not None else box_ellipse(box, (int(gray.shape[0]), int(gray.shape[1]))))
        )
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(DESCRIPTOR_NAMES))


def _labelled(records: Sequence[Record], task: str) -> tuple[list[tuple[Record, Box]], list[int]]:
    lesions, labels = [], []
    for record, box in lesion_boxes(records):
        label = record.malignant if task == "malignancy" else birads_high(record.birads)
        if label is not None:
            lesions.append((record, box))
            labels.append(int(label))
    return lesions, labels


def fit_logistic(features: npt.NDArray[np.float64], labels: Sequence[int], regularisation: float) -> LogisticModel:
    """Standardise on the training rows and fit ``LogisticRegression(C=regularisation)``.

    Raises
    ------
    TrainingError
        scikit-learn is not installed.
    """
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # the serving and evaluate installs have no scikit-learn
        raise TrainingError(
            "fit_lexicon needs scikit-learn, which comes with the train extra: pip install 'breastai[train]' "
            "(or make train-venv)"
        ) from exc

    mean = features.mean(0)
    scale = features.std(0) + 1e-6
    machine = LogisticRegression(C=regularisation, max_iter=5000).fit((features - mean) / scale, np.asarray(labels))
    return LogisticModel(
        DESCRIPTOR_NAMES, mean, scale, np.asarray(machine.coef_[0], dtype=np.float64), float(machine.intercept_[0])
    )


def fit_lexicon(datasets: Path, model_dir: Path, task: str = "malignancy", regularisation: float = 1.0) -> ModelEntry:
    """Fit on the training split, choose the operating point on validation, write the file and manifest entry.

    Raises
    ------
    DatasetError
        ``datasets`` holds no image of the ultrasound datasets, or a file in it cannot be read.
    TrainingError
        The training or validation split lacks labelled lesions of either class for ``task``.
    ModelRegistryError
        ``model_dir`` cannot be read or lacks its segmentation stages.
    """
    role, name = TASKS[task]
    entries = read_manifest(model_dir)
    records = load_records(datasets, US_DATASETS)
    train, train_labels = _labelled([r for r in records if r.split == "train"], task)
    val, val_labels = _labelled([r for r in records if r.split == "val"], task)
    if not train or not val:
        raise TrainingError(f"fit_lexicon: no labelled {task} lesion in the training or validation split of {datasets}")
    for split, labels in (("training", train_labels), ("validation", val_labels)):
        if len(set(labels)) < 2:
            raise TrainingError(
                f"fit_lexicon: the {split} split of {datasets} holds {task} lesions of one class only "
                f"({len(labels)} lesions, {sum(labels)} positive); a logistic model and its operating point need both"
            )
    model = fit_logistic(served_descriptors(model_dir, train), train_labels, regularisation)
    val_scores = [model.probability(row) for row in served_descriptors(model_dir, val)]
    path = model_dir / f"{role}.json"
    path.write_text(json.dumps(model.to_json(), indent=2) + "\n")
    entry = ModelEntry(
        role=role,
        name=name,
        version=VERSION,
        file=path.name,
        sha256=sha256_of(path),
        parameters={
            "kind": ModelKind.LEXICON.value,
            "family": role,
            "task": task,
            "modality": "US",
            "operating_point": youden_threshold(val_labels, val_scores),
            "precision": "JSON coefficients",
            "segmentation": {r: entries[r].sha256 for r in SEGMENTATION_ROLES if r in entries},
            "fitted": {
                "train_cases": len(train),
                "train_positives": int(sum(train_labels)),
                "regularisation_C": regularisation,
                "val_cases": len(val),
                "val_auc": round(auc(val_labels, val_scores), 4),
                "datasets": sorted({r.dataset for r, _ in train}),
            },
        },
    )
    merge_into_manifest(model_dir, {role: entry})
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=BUNDLED_MODEL_DIR,
        help="model folder whose segmentation outlines the lesions and whose manifest gets the entry",
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="malignancy",
        help="malignancy (role lexicon) or birads_high (role lexicon_lh)",
    )
    parser.add_argument(
        "--regularisation", type=float, default=1.0, help="inverse L2 strength C of the logistic regression"
    )
    args = parser.parse_args(argv)
    entry = fit_lexicon(args.datasets, args.model_dir, args.task, args.regularisation)
    fitted = entry.parameters["fitted"]
    print(
        f"{entry.role}: validation AUC {fitted['val_auc']:.4f} on {fitted['val_cases']} lesions, operating point "
        f"{entry.parameters['operating_point']:.3f}, sha256 {entry.sha256}",
        flush=True,
    )


if __name__ == "__main__":
    main()
