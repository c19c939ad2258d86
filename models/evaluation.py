"""Evaluation statistics: AUC with bootstrap CI, operating-point metrics, Dice.

Plain numpy so the numbers can be checked by hand (see the unit tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve, the Mann-Whitney U statistic with ties counted half."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    positives, negatives = s[y == 1], s[y == 0]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def bootstrap_ci(
    labels: npt.ArrayLike, scores: npt.ArrayLike, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC over cases.

    Resamples that happen to contain one class only are drawn again.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    values: list[float] = []
    while len(values) < resamples:
        index = rng.integers(0, len(y), len(y))
        if y[index].min() == y[index].max():
            continue
        values.append(auc(y[index], s[index]))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def mean_ci(values: npt.ArrayLike, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a mean (e.g. per-image Dice)."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def youden_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Score threshold maximising sensitivity + specificity - 1 (chosen on validation data)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    best, best_j = 0.5, -1.0
    for t in np.unique(s):
        predicted = s >= t
        sens = (predicted & (y == 1)).sum() / max(1, (y == 1).sum())
        spec = (~predicted & (y == 0)).sum() / max(1, (y == 0).sum())
        if sens + spec - 1 > best_j:
            best, best_j = float(t), float(sens + spec - 1)
    return best


@dataclass(frozen=True)
class OperatingPoint:
    """Confusion-matrix metrics at one threshold."""

    threshold: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    accuracy: float


def operating_point(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> OperatingPoint:
    """Sensitivity, specificity, PPV, NPV and accuracy at ``threshold``."""
    y = np.asarray(labels, dtype=int)
    predicted = np.asarray(scores, dtype=float) >= threshold
    tp = int((predicted & (y == 1)).sum())
    tn = int((~predicted & (y == 0)).sum())
    fp = int((predicted & (y == 0)).sum())
    fn = int((~predicted & (y == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return OperatingPoint(
        threshold=threshold,
        sensitivity=ratio(tp, tp + fn),
        specificity=ratio(tn, tn + fp),
        ppv=ratio(tp, tp + fp),
        npv=ratio(tn, tn + fn),
        accuracy=ratio(tp + tn, len(y)),
    )


def dice(prediction: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient of two binary masks; two empty masks agree perfectly."""
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * float((prediction & truth).sum()) / total
