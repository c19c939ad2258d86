"""Evaluation maths checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation.stats import auc, bootstrap_ci, dice, mean_ci, operating_point, youden_threshold


def test_auc_matches_hand_count() -> None:
    # positives 0.9, 0.4; negatives 0.1, 0.4, 0.8. Pairs: (0.9>all)=3, (0.4>0.1)=1, (0.4=0.4)=0.5 -> 4.5/6
    assert auc([1, 1, 0, 0, 0], [0.9, 0.4, 0.1, 0.4, 0.8]) == pytest.approx(0.75)


def test_auc_extremes_and_agreement_with_sklearn() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(labels * 0.8, 1.0)
    assert auc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        auc([1, 1], [0.2, 0.3])


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)
    small_labels = rng.integers(0, 2, 60)
    small_scores = rng.normal(small_labels, 1.0)
    big_labels = rng.integers(0, 2, 2000)
    big_scores = rng.normal(big_labels, 1.0)
    low, high = bootstrap_ci(small_labels, small_scores, resamples=300)
    assert low < auc(small_labels, small_scores) < high
    big_low, big_high = bootstrap_ci(big_labels, big_scores, resamples=300)
    assert (big_high - big_low) < (high - low)
    # Binormal with d' = 1: AUC = Phi(1/sqrt(2)) = 0.760
    assert big_low < 0.5 * (1 + math.erf(0.5)) < big_high


def test_mean_ci_and_operating_point_by_hand() -> None:
    low, high = mean_ci([0.5, 0.5, 0.5])
    assert low == high == 0.5
    point = operating_point([1, 1, 0, 0, 0], [0.9, 0.4, 0.1, 0.4, 0.8], threshold=0.5)
    # predicted positive: 0.9 (TP), 0.8 (FP) -> TP1 FN1 TN2 FP1
    assert (point.sensitivity, point.specificity, point.ppv, point.npv, point.accuracy) == pytest.approx(
        (0.5, 2 / 3, 0.5, 2 / 3, 0.6)
    )


def test_youden_threshold_separates_a_separable_set() -> None:
    threshold = youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9])
    assert 0.3 < threshold <= 0.6


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(2 * 4 / 16)


def test_plots_without_matplotlib_name_the_evaluate_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from models.errors import EvaluationError
    from models.evaluation.plots import save_roc_png

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as where matplotlib is not installed
    with pytest.raises(EvaluationError, match=r"breastai\[evaluate\].*make evaluate-venv"):
        save_roc_png("unused.png", {"dl_u": ([0, 1], [0.2, 0.8])}, title="ROC")
