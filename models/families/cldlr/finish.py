"""CLDLR's finish stage: the three SVMs the paper compares, over deep and clinical features."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.svm import SVC

from models.families.finish_run import FinishRun, Lesion
from models.inference.family_scorer import age_inputs, diameter_inputs
from models.inference.svm import SvmModel, fit_platt


def clinical_features(lesion: Lesion) -> list[float]:
    """CLDLR's clinical variables that DICOM can carry: age and maximum lesion diameter.

    ``[age / 100, age known, max diameter mm / 50, diameter known]``: a
    missing value is 0 with its flag 0, so the SVM runs without it. The same
    functions build them when serving, so training and serving cannot drift.
    """
    return age_inputs(lesion.record.age_years) + diameter_inputs(lesion.box, lesion.record.pixel_spacing_mm)


def finish_svms(run: FinishRun, lesions: Mapping[str, Sequence[Lesion]]) -> dict[str, Any]:
    """Fit the clinical, DLR and CLDLR SVMs on the training split, Platt-scaled on validation; ``svm_*.npz``."""
    model = run.best_network()
    deep = {split: run.network_outputs(model, lesions[split]) for split in ("train", "val")}
    clinical = {
        split: np.array([clinical_features(s) for s in lesions[split]], dtype=np.float32) for split in ("train", "val")
    }
    labels = {split: np.array([s.label for s in lesions[split]]) for split in ("train", "val")}
    summary: dict[str, Any] = {}
    for variant, features in (
        ("clinical", clinical),
        ("dlr", deep),
        ("cldlr", {split: np.concatenate([deep[split], clinical[split]], axis=1) for split in ("train", "val")}),
    ):
        mean = features["train"].mean(0)
        scale = features["train"].std(0) + 1e-6
        machine = SVC(kernel="rbf", C=1.0, gamma="scale").fit((features["train"] - mean) / scale, labels["train"])
        svm = SvmModel(
            mean=mean.astype(np.float64),
            scale=scale.astype(np.float64),
            support_vectors=np.asarray(machine.support_vectors_, dtype=np.float64),
            dual_coefficients=np.asarray(machine.dual_coef_[0], dtype=np.float64),
            intercept=float(machine.intercept_[0]),
            gamma=float(machine._gamma),
            platt_a=0.0,
            platt_b=0.0,
        )
        platt_a, platt_b = fit_platt(svm.decision(features["val"]), labels["val"])
        svm = SvmModel(**{**svm.__dict__, "platt_a": platt_a, "platt_b": platt_b})
        svm.save(run.work / f"svm_{variant}.npz")
        summary[f"{variant}_val_auc"] = run.auc(labels["val"], svm.probability(features["val"]))
    return summary


def svm_scores(
    graph_output: Callable[[str], list[np.ndarray]], side_files: Mapping[str, Path], lesions: Sequence[Lesion]
) -> list[float]:
    """The served CLDLR score: the CLDLR SVM over the exported graph's deep features and the clinical variables."""
    svm = SvmModel.load(side_files["cldlr"])
    deep = [np.asarray(features[0], dtype=np.float64) for features in graph_output("deep_features")]
    return [
        float(svm.probability(np.concatenate([d, clinical_features(s)]))[0]) for d, s in zip(deep, lesions, strict=True)
    ]
