"""DeLong, ROC, calibration and segmentation-distance maths checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from models.evaluation.stats import (
    auc,
    auc_variance_delong,
    brier_score,
    delong_test,
    dice,
    expected_calibration_error,
    hausdorff95,
    holm_adjust,
    iou,
    mean_ci,
    reliability_curve,
    roc_curve,
)

# ------------------------------------------------------------------ DeLong by hand
#
# 3 positives, 3 negatives, two models (B has a positive/negative tie at 0.5).
#
#            positives X1 X2 X3      negatives Y1 Y2 Y3
#   model A: 0.9  0.6  0.35          0.7  0.3  0.1
#   model B: 0.8  0.5  0.2           0.5  0.3  0.1
#
# Placements (psi = 1 if X > Y, 1/2 if tied, 0 otherwise):
#   V10 (fraction of negatives each positive beats):
#     A: X1 beats all -> 1; X2 beats 0.3, 0.1 -> 2/3; X3 beats 0.3, 0.1 -> 2/3
#     B: X1 -> 1; X2 ties 0.5, beats 0.3, 0.1 -> 2.5/3 = 5/6; X3 beats 0.1 -> 1/3
#   V01 (fraction of positives above each negative):
#     A: Y1=0.7 below 0.9 only -> 1/3; Y2 -> 1; Y3 -> 1
#     B: Y1=0.5 below 0.8, tie 0.5 -> 1.5/3 = 1/2; Y2=0.3 -> 2/3; Y3 -> 1
#   AUC_A = mean V10_A = (1 + 2/3 + 2/3)/3 = 7/9 ; AUC_B = (1 + 5/6 + 1/3)/3 = 13/18
#
# Sample (co)variances, denominator m - 1 = n - 1 = 2:
#   V10 deviations  A: (2/9, -1/9, -1/9)      B: (5/18, 2/18, -7/18)
#     S10_AA = (4 + 1 + 1)/81 / 2 = 1/27      S10_BB = (25 + 4 + 49)/324 / 2 = 13/108
#     S10_AB = (10 - 2 + 7)/162 / 2 = 5/108
#   V01 deviations  A: (-4/9, 2/9, 2/9)       B: (-4/18, -1/18, 5/18)
#     S01_AA = (16 + 4 + 4)/81 / 2 = 4/27     S01_BB = (16 + 1 + 25)/324 / 2 = 7/108
#     S01_AB = (16 - 2 + 10)/162 / 2 = 2/27
# DeLong covariance S = S10/3 + S01/3:
#   Var A = (1/27 + 4/27)/3 = 5/81;  Var B = (13/108 + 7/108)/3 = 5/81;  Cov = (5/108 + 8/108)/3 = 13/324
#   Var(A - B) = 5/81 + 5/81 - 2 * 13/324 = 14/324 = 7/162
#   z = (7/9 - 13/18) / sqrt(7/162) = (1/18) * sqrt(162/7) = 1/sqrt(14) = 0.267261...
#   p = 2 (1 - Phi(1/sqrt(14))) = erfc(1/sqrt(28)) = 0.789268...

HAND_LABELS = [1, 1, 1, 0, 0, 0]
HAND_A = [0.9, 0.6, 0.35, 0.7, 0.3, 0.1]
HAND_B = [0.8, 0.5, 0.2, 0.5, 0.3, 0.1]


def test_delong_hand_example() -> None:
    result = delong_test(HAND_LABELS, HAND_A, HAND_B)
    assert result.auc_a == pytest.approx(7 / 9)
    assert result.auc_b == pytest.approx(13 / 18)
    assert result.difference == pytest.approx(1 / 18)
    assert result.variance_a == pytest.approx(5 / 81)
    assert result.variance_b == pytest.approx(5 / 81)
    assert result.covariance[0][1] == pytest.approx(13 / 324)
    assert result.covariance[1][0] == pytest.approx(13 / 324)
    assert result.standard_error**2 == pytest.approx(7 / 162)
    assert result.z == pytest.approx(1 / math.sqrt(14))
    assert result.p_value == pytest.approx(0.7892680261, abs=1e-9)
    assert (result.n_positive, result.n_negative) == (3, 3)


def test_single_model_delong_variance_by_hand() -> None:
    assert auc_variance_delong(HAND_LABELS, HAND_A) == pytest.approx(5 / 81)
    assert auc_variance_delong(HAND_LABELS, HAND_B) == pytest.approx(5 / 81)


def _pairwise_placements(
    labels: npt.NDArray[np.int64], scores: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The O(m n) definition of the placements, to check the midrank shortcut against."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def test_delong_matches_the_pairwise_definition_with_many_ties() -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 250)
    # Rounded to one decimal: lots of ties within and across classes.
    scores_a = np.round(rng.normal(labels * 1.0, 1.0), 1)
    scores_b = np.round(0.5 * scores_a + rng.normal(labels * 0.3, 0.8), 1)
    v10_a, v01_a = _pairwise_placements(labels, scores_a)
    v10_b, v01_b = _pairwise_placements(labels, scores_b)
    expected = np.cov(np.vstack([v10_a, v10_b])) / v10_a.size + np.cov(np.vstack([v01_a, v01_b])) / v01_a.size
    result = delong_test(labels, scores_a, scores_b)
    np.testing.assert_allclose(np.array(result.covariance), expected, rtol=1e-12, atol=1e-15)
    assert result.auc_a == pytest.approx(v10_a.mean())
    assert auc(labels, scores_b) == pytest.approx(v01_b.mean())


def test_delong_is_symmetric_in_the_two_models() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 120)
    scores_a = rng.normal(labels * 1.2, 1.0)
    scores_b = rng.normal(labels * 0.7, 1.0)
    forward = delong_test(labels, scores_a, scores_b)
    backward = delong_test(labels, scores_b, scores_a)
    assert backward.p_value == pytest.approx(forward.p_value)
    assert backward.z == pytest.approx(-forward.z)
    assert backward.difference == pytest.approx(-forward.difference)
    assert backward.variance_a == pytest.approx(forward.variance_b)


def test_identical_or_equally_ranked_scores_give_p_one() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 80)
    scores = rng.uniform(0.01, 1.0, 80)
    for other in (scores, scores**3, np.log(scores)):  # same ranking -> same placements
        result = delong_test(labels, scores, other)
        assert result.z == 0.0
        assert result.p_value == 1.0
        assert result.standard_error == 0.0
        assert result.difference == 0.0


def test_clearly_better_model_is_significant_and_equal_models_are_not() -> None:
    rng = np.random.default_rng(2024)
    labels = rng.integers(0, 2, 400)
    strong = rng.normal(labels * 2.0, 1.0)  # binormal AUC ~ 0.92
    weak = rng.normal(labels * 0.5, 1.0)  # binormal AUC ~ 0.64
    result = delong_test(labels, strong, weak)
    assert result.difference > 0.15
    assert result.p_value < 0.05
    low, high = result.difference_ci(0.95)
    assert 0.0 < low < result.difference < high


def test_delong_false_positive_rate_is_near_nominal_under_the_null() -> None:
    # Two equally good, correlated models: about 5% of tests should reject at 0.05.
    # A variance off by a factor of 2 would give ~0.6% or ~17%.
    rng = np.random.default_rng(7)
    rejections = 0
    trials = 300
    for _ in range(trials):
        labels = rng.integers(0, 2, 120)
        shared = rng.normal(0.0, 1.0, 120)
        scores_a = labels + shared + rng.normal(0.0, 1.0, 120)
        scores_b = labels + shared + rng.normal(0.0, 1.0, 120)
        rejections += delong_test(labels, scores_a, scores_b).p_value < 0.05
    assert 0.015 <= rejections / trials <= 0.10


def test_delong_needs_two_cases_of_each_class() -> None:
    with pytest.raises(ValueError, match="at least 2 positive"):
        delong_test([1, 0, 0], [0.9, 0.1, 0.2], [0.8, 0.3, 0.1])
    with pytest.raises(ValueError, match="labels must be 0"):
        delong_test([1, 2, 0, 0], [0.9, 0.1, 0.2, 0.3], [0.8, 0.3, 0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        delong_test([1, 1, 0, 0], [0.9, math.nan, 0.2, 0.3], [0.8, 0.3, 0.1, 0.2])


def test_holm_adjustment_by_hand() -> None:
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> kept monotone at 0.06
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.6, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []


# ------------------------------------------------------------------ ROC curve


def test_roc_curve_by_hand_with_a_tie() -> None:
    # positives 0.9, 0.4; negatives 0.1, 0.4, 0.8 (AUC 0.75, see test_evaluation.py)
    fpr, tpr, thresholds = roc_curve([1, 1, 0, 0, 0], [0.9, 0.4, 0.1, 0.4, 0.8])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.4, 0.1])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1 / 3, 2 / 3, 1.0])
    # The tie at 0.4 is a diagonal step, so the trapezoid area is the tie-half AUC.
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_roc_curve_area_matches_auc_and_sklearn() -> None:
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels, 1.0), 1)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(labels, scores))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    reference_fpr, reference_tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, reference_fpr)
    np.testing.assert_allclose(tpr, reference_tpr)


# ------------------------------------------------------------------ calibration


def test_brier_score_by_hand() -> None:
    # (0.1^2 + 0.2^2 + 0.4^2 + 0.5^2) / 4 = (0.01 + 0.04 + 0.16 + 0.25) / 4
    assert brier_score([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.5]) == pytest.approx(0.115)
    # Predicting the prevalence p everywhere scores p (1 - p).
    assert brier_score([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.25 * 0.75)
    assert brier_score([1, 0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1, 0], [1.2, 0.0])


def test_reliability_curve_by_hand() -> None:
    # 4 bins [0, .25) [.25, .5) [.5, .75) [.75, 1]:
    #   bin 0: p 0.1, 0.2 labels 0, 1 -> mean p 0.15, observed 0.5
    #   bin 1: empty
    #   bin 2: p 0.6, 0.7 labels 0, 1 -> mean p 0.65, observed 0.5
    #   bin 3: p 0.9, 1.0 labels 1, 1 -> mean p 0.95, observed 1.0 (p = 1 falls in the last bin)
    # ECE = 2/6 * |0.5 - 0.15| + 2/6 * |0.5 - 0.65| + 2/6 * |1 - 0.95| = (0.35 + 0.15 + 0.05) / 3
    labels = [0, 1, 0, 1, 1, 1]
    probabilities = [0.1, 0.2, 0.6, 0.7, 0.9, 1.0]
    curve = reliability_curve(labels, probabilities, bins=4)
    np.testing.assert_allclose(curve.bin_edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(curve.counts, [2, 0, 2, 2])
    np.testing.assert_array_equal(curve.populated, [True, False, True, True])
    np.testing.assert_allclose(curve.mean_predicted[curve.populated], [0.15, 0.65, 0.95])
    np.testing.assert_allclose(curve.observed_fraction[curve.populated], [0.5, 0.5, 1.0])
    assert math.isnan(curve.mean_predicted[1]) and math.isnan(curve.observed_fraction[1])
    assert curve.expected_calibration_error == pytest.approx(0.55 / 3)
    assert expected_calibration_error(labels, probabilities, bins=4) == pytest.approx(0.55 / 3)


def test_perfectly_calibrated_bins_have_zero_ece() -> None:
    # Each bin's observed rate equals its mean prediction: 1 of 4 at 0.25, 3 of 4 at 0.75.
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    probabilities = [0.25] * 4 + [0.75] * 4
    assert expected_calibration_error(labels, probabilities, bins=10) == pytest.approx(0.0)


# ------------------------------------------------------------------ segmentation


def _square(shape: tuple[int, int], row: int, column: int, size: int) -> npt.NDArray[np.bool_]:
    mask = np.zeros(shape, dtype=bool)
    mask[row : row + size, column : column + size] = True
    return mask


def test_iou_and_dice_of_shifted_squares() -> None:
    # 10x10 squares shifted 3 columns: overlap 10x7 = 70, union 200 - 70 = 130.
    first = _square((40, 40), 10, 10, 10)
    second = _square((40, 40), 10, 13, 10)
    assert iou(first, second) == pytest.approx(70 / 130)
    assert dice(first, second) == pytest.approx(140 / 200)
    empty = np.zeros((40, 40), dtype=bool)
    assert iou(empty, empty) == 1.0
    assert iou(first, empty) == 0.0


def test_hd95_of_shifted_squares() -> None:
    # Surfaces are the 36-pixel outlines. From the left square's outline to the right one's:
    # left column (rows 11-18) 3 px each; top/bottom rows at columns 10, 11, 12: 3, 2, 1 px,
    # columns 13-19: 0 (on the other outline); right column rows 11-18: min(distance to
    # top/bottom edge, 3) = 1 2 3 3 3 3 2 1. Fourteen of 36 distances are 3 = the maximum,
    # so the 95th percentile is 3 in both directions.
    first = _square((40, 40), 10, 10, 10)
    second = _square((40, 40), 10, 13, 10)
    assert hausdorff95(first, second) == pytest.approx(3.0)
    assert hausdorff95(second, first) == pytest.approx(3.0)
    # Anisotropic pixels (0.5 mm between rows, 2 mm between columns): the column shift is
    # 6 mm; the right-column distances to the top/bottom edges shrink to <= 2 mm, leaving
    # ten of 36 distances at 6 mm, still above the 95th percentile rank.
    assert hausdorff95(first, second, spacing=(0.5, 2.0)) == pytest.approx(6.0)
    assert hausdorff95(first, first) == 0.0


def test_hd95_ignores_a_single_stray_pixel_that_the_maximum_would_not() -> None:
    truth = _square((100, 100), 10, 10, 20)  # 76 surface pixels
    predicted = truth.copy()
    predicted[80, 80] = True  # ~71 px from the square, 1 of 77 surface pixels
    assert hausdorff95(predicted, truth) == pytest.approx(0.0)


def test_hd95_empty_mask_conventions() -> None:
    empty = np.zeros((20, 20), dtype=bool)
    square = _square((20, 20), 5, 5, 5)
    assert math.isnan(hausdorff95(empty, square))
    assert math.isnan(hausdorff95(square, empty))
    assert math.isnan(hausdorff95(empty, empty))
    with pytest.raises(ValueError, match="shapes differ"):
        hausdorff95(square, np.zeros((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(square, square, spacing=(1.0, 1.0, 1.0))


def _brute_force_hd95(first: npt.NDArray[np.bool_], second: npt.NDArray[np.bool_]) -> float:
    def outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        padded = np.pad(mask, 1)
        interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(mask & ~interior).astype(np.float64)

    a, b = outline(first), outline(second)
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))
    return max(float(np.percentile(distances.min(axis=1), 95)), float(np.percentile(distances.min(axis=0), 95)))


def test_hd95_matches_brute_force_on_random_blobs() -> None:
    rng = np.random.default_rng(4)
    rows, columns = np.mgrid[0:48, 0:48]
    for _ in range(5):
        centre_a, centre_b = rng.uniform(12, 36, 2), rng.uniform(12, 36, 2)
        radius_a, radius_b = rng.uniform(4, 10, 2)
        first = (rows - centre_a[0]) ** 2 + (columns - centre_a[1]) ** 2 < radius_a**2
        second = (rows - centre_b[0]) ** 2 + (columns - centre_b[1]) ** 2 < radius_b**2
        assert hausdorff95(first, second) == pytest.approx(_brute_force_hd95(first, second))


def test_hd95_on_full_size_masks() -> None:
    rows, columns = np.mgrid[0:512, 0:512]
    disc = (rows - 256) ** 2 + (columns - 256) ** 2 < 150**2
    shifted = (rows - 256) ** 2 + (columns - 261) ** 2 < 150**2
    assert hausdorff95(disc, shifted) == pytest.approx(5.0, abs=1.0)


def test_mean_ci_of_nothing_is_undefined() -> None:
    assert all(math.isnan(bound) for bound in mean_ci([]))


# ------------------------------------------------------------------ clustered data (Obuchowski 1997, cluster bootstrap)
#
# Every case copied once into its own cluster carries no more information than
# the original cases: the clustered statistics of the copies must equal the
# unclustered statistics of the originals, exactly.


def _copied_twice(
    labels: npt.NDArray[np.int64], *scores: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.float64]], list[str]]:
    return (
        np.repeat(labels, 2),
        [np.repeat(s, 2) for s in scores],
        [f"case{i:04d}" for i in np.repeat(np.arange(labels.size), 2)],
    )


def _correlated_scores(
    n: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.int64)
    shared = rng.normal(size=n) + 1.2 * labels
    return labels, shared + 0.7 * rng.normal(size=n), shared + 0.9 * rng.normal(size=n)


def test_clustered_delong_of_copied_cases_equals_delong_of_the_originals() -> None:
    labels, a, b = _correlated_scores(120, seed=3)
    copied_labels, (copied_a, copied_b), clusters = _copied_twice(labels, a, b)
    original = delong_test(labels, a, b)
    clustered = delong_test(copied_labels, copied_a, copied_b, clusters=clusters)
    naive = delong_test(copied_labels, copied_a, copied_b)
    assert clustered.auc_a == pytest.approx(original.auc_a) and clustered.difference == pytest.approx(
        original.difference
    )
    assert np.allclose(clustered.covariance, original.covariance, rtol=1e-10, atol=0)
    assert clustered.standard_error == pytest.approx(original.standard_error, rel=1e-10)
    assert clustered.p_value == pytest.approx(original.p_value, rel=1e-8)
    # Ignoring the clusters counts every case twice: the error shrinks by about sqrt(2).
    assert naive.standard_error == pytest.approx(original.standard_error / math.sqrt(2), rel=0.05)
    assert auc_variance_delong(copied_labels, copied_a, clusters=clusters) == pytest.approx(
        auc_variance_delong(labels, a), rel=1e-10
    )


def test_clustered_delong_with_one_case_per_cluster_is_delong() -> None:
    labels, a, b = _correlated_scores(60, seed=4)
    plain = delong_test(labels, a, b)
    singletons = delong_test(labels, a, b, clusters=[f"p{i}" for i in range(labels.size)])
    assert np.allclose(singletons.covariance, plain.covariance, rtol=1e-10, atol=0)
    assert singletons.p_value == pytest.approx(plain.p_value, rel=1e-10)


def test_clustered_variance_counts_the_pairs_inside_a_cluster() -> None:
    # Patients with a malignant and a benign lesion each: the cross term of Obuchowski's variance is not zero,
    # and the clustered variance should track the spread of the AUC over resampled patients.
    rng = np.random.default_rng(5)
    patients = 150
    effect = rng.normal(size=patients)  # a patient-level shift of both lesions' scores
    labels = np.tile([1, 0], patients)
    scores = np.repeat(effect, 2) + labels * 1.0 + 0.6 * rng.normal(size=2 * patients)
    clusters = [f"p{i}" for i in np.repeat(np.arange(patients), 2)]
    variance = auc_variance_delong(labels, scores, clusters=clusters)
    members = np.arange(2 * patients).reshape(patients, 2)
    boot = [
        auc(labels[idx], scores[idx])
        for idx in (members[rng.integers(0, patients, patients)].ravel() for _ in range(2000))
    ]
    assert variance == pytest.approx(float(np.var(boot)), rel=0.15)
    # Here the shared shift helps ranking across patients less than within them: the plain DeLong variance differs.
    assert abs(auc_variance_delong(labels, scores) - variance) / variance > 0.15


def test_cluster_bootstrap_of_copied_cases_equals_the_case_bootstrap_of_the_originals() -> None:
    from models.evaluation.stats import bootstrap_ci

    labels, a, _ = _correlated_scores(80, seed=6)
    copied_labels, (copied_a,), clusters = _copied_twice(labels, a)
    assert bootstrap_ci(copied_labels, copied_a, resamples=300, seed=1, clusters=clusters) == pytest.approx(
        bootstrap_ci(labels, a, resamples=300, seed=1)
    )
    values = np.random.default_rng(7).random(50)
    assert mean_ci(
        np.repeat(values, 2), resamples=300, seed=2, clusters=[f"c{i:03d}" for i in np.repeat(np.arange(50), 2)]
    ) == pytest.approx(mean_ci(values, resamples=300, seed=2))


def test_clusters_must_match_the_cases() -> None:
    with pytest.raises(ValueError, match="one entry per case"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], clusters=["a", "b"])
    with pytest.raises(ValueError, match="at least two clusters"):
        auc_variance_delong([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], clusters=["a", "a", "b", "a"])
