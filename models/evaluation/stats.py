"""Evaluation statistics for classifiers and segmenters.

Plain numpy (scipy only for the distance transform of :func:`hausdorff95`) so
that every number can be checked by hand; the unit tests do exactly that.

Classification: AUC with a percentile-bootstrap or DeLong confidence interval,
DeLong's paired test of two AUCs, the ROC curve, operating-point metrics and
calibration (Brier score, reliability curve, expected calibration error).
Segmentation: Dice, IoU and the 95th-percentile Hausdorff distance.

Labels are 0/1 (``1`` = positive, e.g. malignant); scores are any real numbers
where higher means "more positive", except for the calibration functions,
which need probabilities in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


# ---------------------------------------------------------------- input checks


def _binary_labels(labels: npt.ArrayLike) -> IntArray:
    """Labels as a 1-D int array, refusing anything but 0/1 (a 2 or 0.7 is a data bug, not a class)."""
    raw = np.asarray(labels)
    if raw.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {raw.shape}")
    as_int = raw.astype(np.int64)
    if raw.size and (not np.array_equal(as_int, raw) or not np.isin(as_int, (0, 1)).all()):
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    return as_int


def _finite_scores(scores: npt.ArrayLike, length: int, name: str = "scores") -> FloatArray:
    """Scores as a 1-D float array matching the labels; NaN has no rank, so it is refused."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] != length:
        raise ValueError(
            f"{name} must be one-dimensional with one value per label ({length}), got shape {values.shape}"
        )
    if np.isnan(values).any():
        raise ValueError(f"{name} contain NaN")
    return values


def _probabilities(probabilities: npt.ArrayLike, length: int) -> FloatArray:
    values = _finite_scores(probabilities, length, "probabilities")
    if ((values < 0.0) | (values > 1.0)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return values


def _require_both_classes(labels: IntArray, minimum: int = 1) -> tuple[int, int]:
    n_positive = int(labels.sum())
    n_negative = int(labels.size - n_positive)
    if n_positive < minimum or n_negative < minimum:
        if minimum == 1:
            raise ValueError("AUC needs at least one positive and one negative case")
        raise ValueError(
            f"this statistic needs at least {minimum} positive and {minimum} negative cases "
            f"(got {n_positive} positive, {n_negative} negative)"
        )
    return n_positive, n_negative


# ---------------------------------------------------------------- AUC and DeLong


def _midranks(values: FloatArray) -> FloatArray:
    """1-based ranks with tied values sharing the mean of the ranks they span (O(n log n))."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank_of_group = np.cumsum(counts)
    midrank_of_group = last_rank_of_group - (counts - 1) / 2.0
    return np.asarray(midrank_of_group[inverse.reshape(-1)], dtype=np.float64)


def _placements(labels: IntArray, scores: FloatArray) -> tuple[FloatArray, FloatArray]:
    """DeLong's structural components ("placements") of one score vector.

    For each positive case X_i the placement V10_i is the fraction of negatives
    it outscores, ties counted half; for each negative Y_j, V01_j is the
    fraction of positives that outscore it. Both average to the AUC.

    Sun & Xu (2014) obtain them from midranks instead of the m x n comparison
    matrix: with T_z the midrank in the pooled sample, T_x within the positives
    and T_y within the negatives, V10 = (T_z - T_x) / n and
    V01 = 1 - (T_z - T_y) / m. Ranking within a class removes exactly the
    comparisons of a case with its own class, leaving the cross-class counts.
    """
    positives, negatives = scores[labels == 1], scores[labels == 0]
    m, n = positives.size, negatives.size
    pooled_ranks = _midranks(np.concatenate([positives, negatives]))
    positive_placements = (pooled_ranks[:m] - _midranks(positives)) / n
    negative_placements = 1.0 - (pooled_ranks[m:] - _midranks(negatives)) / m
    return positive_placements, negative_placements


def _cluster_codes(clusters: npt.ArrayLike | None, length: int) -> IntArray | None:
    """Integer codes 0..K-1 of the cluster (patient) of each case, or None when cases are independent."""
    if clusters is None:
        return None
    values = np.asarray(clusters)
    if values.shape != (length,):
        raise ValueError(f"clusters must have one entry per case ({length}), got shape {values.shape}")
    _, codes = np.unique(values, return_inverse=True)
    return np.asarray(codes.reshape(-1), dtype=np.int64)


def _cluster_members(codes: IntArray) -> list[IntArray]:
    """Case indices of each cluster, in code order."""
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes))[:-1]
    return [np.asarray(part, dtype=np.int64) for part in np.split(order, bounds)]


def _clustered_covariance(
    codes: IntArray, labels: IntArray, placements: Sequence[tuple[FloatArray, FloatArray]]
) -> FloatArray:
    """Covariance matrix of AUC estimates from clustered cases (Obuchowski 1997).

    Each model contributes its (positive, negative) placements. With cluster
    sums V10_i, V01_i of the placements, m_i positives and n_i negatives in
    cluster i, M and N in all, AUC estimate A, and the residuals
    ``r_i = V10_i - m_i A``, ``s_i = V01_i - n_i A``:

        cov(A_k, A_l) = I10 / ((I10 - 1) M^2) sum r_ki r_li
                      + I01 / ((I01 - 1) N^2) sum s_ki s_li
                      + I / ((I - 1) M N) sum (r_ki s_li + s_ki r_li)

    where I10 (I01) counts clusters with a positive (negative) case and I all
    clusters. With one case per cluster the last term vanishes and the first
    two are DeLong's S10 / M and S01 / N.

    References
    ----------
    N. A. Obuchowski, "Nonparametric analysis of clustered ROC curve data",
    Biometrics 53(2):567-578, 1997.
    """
    positive = labels == 1
    clusters = int(codes.max()) + 1
    m_i = np.bincount(codes[positive], minlength=clusters).astype(np.float64)
    n_i = np.bincount(codes[~positive], minlength=clusters).astype(np.float64)
    big_m, big_n = float(m_i.sum()), float(n_i.sum())
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if i10 < 2 or i01 < 2:
        raise ValueError(
            f"clustered variance needs positives and negatives in at least two clusters each (got {i10}, {i01})"
        )
    residuals = []
    for positive_placements, negative_placements in placements:
        area = float(positive_placements.mean())
        v10 = np.bincount(codes[positive], weights=positive_placements, minlength=clusters)
        v01 = np.bincount(codes[~positive], weights=negative_placements, minlength=clusters)
        residuals.append((v10 - m_i * area, v01 - n_i * area))
    k = len(residuals)
    covariance = np.empty((k, k), dtype=np.float64)
    for a, (r_a, s_a) in enumerate(residuals):
        for b, (r_b, s_b) in enumerate(residuals):
            covariance[a, b] = (
                i10 / ((i10 - 1) * big_m**2) * float(r_a @ r_b)
                + i01 / ((i01 - 1) * big_n**2) * float(s_a @ s_b)
                + clusters / ((clusters - 1) * big_m * big_n) * float(r_a @ s_b + s_a @ r_b)
            )
    return covariance


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic with ties counted half.

    Parameters
    ----------
    labels : array_like of {0, 1}
    scores : array_like of float
        Higher means more likely positive; NaN is refused.

    Returns
    -------
    float
        P(score of a random positive > score of a random negative) + 0.5 P(tie).

    Raises
    ------
    ValueError
        Without at least one positive and one negative case.

    Notes
    -----
    Computed from midranks (Sun & Xu 2014), O(n log n), so bootstrapping a
    few thousand cases stays fast.
    """
    y = _binary_labels(labels)
    s = _finite_scores(scores, y.size)
    _require_both_classes(y)
    positive_placements, _ = _placements(y, s)
    return float(positive_placements.mean())


def bootstrap_ci(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: npt.ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC over cases, or over clusters of them.

    Cases are resampled with replacement; resamples that happen to contain one
    class only are drawn again (their AUC is undefined), which conditions the
    interval on both classes being present, as they are in the data. With
    ``clusters`` (e.g. the patient of each image), whole clusters are
    resampled, so that several images of one patient count as one draw
    (the cluster bootstrap; Field & Welsh 2007).

    Parameters
    ----------
    labels, scores : array_like
        As for :func:`auc`.
    resamples : int
        Number of bootstrap resamples (Efron & Tibshirani 1993 suggest >= 1000
        for percentile intervals).
    seed : int
        Seed of the numpy generator, so reports are reproducible.
    level : float
        Coverage, e.g. 0.95.
    clusters : array_like, optional
        One cluster key per case; None treats every case as its own.

    Returns
    -------
    tuple of float
        (low, high) percentiles of the bootstrap AUC distribution.
    """
    y = _binary_labels(labels)
    s = _finite_scores(scores, y.size)
    # Checked up front: with one class the redraw loop below would never end.
    _require_both_classes(y)
    codes = _cluster_codes(clusters, y.size)
    members = _cluster_members(codes) if codes is not None else None
    rng = np.random.default_rng(seed)
    values: list[float] = []
    while len(values) < resamples:
        if members is None:
            index = rng.integers(0, len(y), len(y))
        else:
            index = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        if y[index].min() == y[index].max():
            continue
        positive_placements, _ = _placements(y[index], s[index])
        values.append(float(positive_placements.mean()))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def auc_variance_delong(labels: npt.ArrayLike, scores: npt.ArrayLike, clusters: npt.ArrayLike | None = None) -> float:
    """Variance of one AUC estimate by DeLong, DeLong & Clarke-Pearson (1988).

    ``Var(AUC) = S10 / m + S01 / n`` where S10 and S01 are the sample variances
    (denominators m - 1 and n - 1) of the positive and negative placements
    (see :func:`delong_test`) and m, n the numbers of positives and negatives.
    With ``clusters``, Obuchowski's (1997) clustered form instead
    (:func:`_clustered_covariance`).

    Raises
    ------
    ValueError
        With fewer than two positives or two negatives (a sample variance needs two values).
    """
    y = _binary_labels(labels)
    s = _finite_scores(scores, y.size)
    n_positive, n_negative = _require_both_classes(y, minimum=2)
    positive_placements, negative_placements = _placements(y, s)
    codes = _cluster_codes(clusters, y.size)
    if codes is not None:
        return float(_clustered_covariance(codes, y, [(positive_placements, negative_placements)])[0, 0])
    return float(positive_placements.var(ddof=1) / n_positive + negative_placements.var(ddof=1) / n_negative)


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of two correlated AUCs measured on the same cases.

    Attributes
    ----------
    auc_a, auc_b : float
        The two AUCs.
    difference : float
        ``auc_a - auc_b``.
    covariance : tuple of tuple of float
        2 x 2 DeLong covariance matrix of (auc_a, auc_b); the diagonal holds
        the two variances.
    standard_error : float
        Standard error of the difference, ``sqrt(var_a + var_b - 2 cov_ab)``.
    z : float
        ``difference / standard_error``; 0 when both are 0.
    p_value : float
        Two-sided p-value from the standard normal distribution.
    n_positive, n_negative : int
        Case counts the test was computed on.
    """

    auc_a: float
    auc_b: float
    difference: float
    covariance: tuple[tuple[float, float], tuple[float, float]]
    standard_error: float
    z: float
    p_value: float
    n_positive: int
    n_negative: int

    @property
    def variance_a(self) -> float:
        return self.covariance[0][0]

    @property
    def variance_b(self) -> float:
        return self.covariance[1][1]

    def difference_ci(self, level: float = 0.95) -> tuple[float, float]:
        """Wald interval ``difference +/- z_(1-alpha/2) * standard_error`` (not clipped to [-1, 1])."""
        half_width = NormalDist().inv_cdf(0.5 + level / 2.0) * self.standard_error
        return self.difference - half_width, self.difference + half_width


def delong_test(
    labels: npt.ArrayLike, scores_a: npt.ArrayLike, scores_b: npt.ArrayLike, clusters: npt.ArrayLike | None = None
) -> DeLongResult:
    """Compare two AUCs on the same cases (DeLong, DeLong & Clarke-Pearson 1988).

    Parameters
    ----------
    labels : array_like of {0, 1}
    scores_a, scores_b : array_like of float
        Scores of two models for the same cases, in the same order.
    clusters : array_like, optional
        One cluster key per case (e.g. the patient); the covariance is then
        Obuchowski's (1997) for clustered data (:func:`_clustered_covariance`),
        which reduces to DeLong's when every cluster holds one case.

    Returns
    -------
    DeLongResult

    Raises
    ------
    ValueError
        With fewer than two positives or two negatives.

    Notes
    -----
    Let V10[k, i] be the placement of positive i under model k (fraction of
    negatives it outscores, ties half) and V01[k, j] the placement of negative
    j (fraction of positives outscoring it). Then AUC_k = mean_i V10[k, i] and

        S = S10 / m + S01 / n,

    where S10 and S01 are the 2 x 2 sample covariance matrices (denominators
    m - 1, n - 1) of the placements across models. The statistic
    ``z = (AUC_a - AUC_b) / sqrt(S_aa + S_bb - 2 S_ab)`` is asymptotically
    standard normal under H0: AUC_a = AUC_b. Placements are computed from
    midranks as in Sun & Xu (2014), O(n log n) instead of O(m n).

    The variance of the difference is computed directly from the per-case
    differences of placements (algebraically equal to S_aa + S_bb - 2 S_ab),
    so that models ranking the cases identically give exactly 0 rather than
    rounding noise. Then the AUCs are equal too and the result is z = 0,
    p = 1. If the variance is 0 while the AUCs differ (a degenerate sample in
    which every case moves by the same amount), z is +/-inf and p = 0.

    References
    ----------
    E. R. DeLong, D. M. DeLong, D. L. Clarke-Pearson, "Comparing the areas under
    two or more correlated receiver operating characteristic curves: a
    nonparametric approach", Biometrics 44(3):837-845, 1988.
    X. Sun, W. Xu, "Fast implementation of DeLong's algorithm for comparing the
    areas under correlated receiver operating characteristic curves", IEEE
    Signal Processing Letters 21(11):1389-1393, 2014.
    """
    y = _binary_labels(labels)
    a = _finite_scores(scores_a, y.size, "scores_a")
    b = _finite_scores(scores_b, y.size, "scores_b")
    m, n = _require_both_classes(y, minimum=2)
    positive_a, negative_a = _placements(y, a)
    positive_b, negative_b = _placements(y, b)

    codes = _cluster_codes(clusters, y.size)
    auc_a, auc_b = float(positive_a.mean()), float(positive_b.mean())
    difference = float((positive_a - positive_b).mean())
    if codes is None:
        s10 = np.cov(np.vstack([positive_a, positive_b]), ddof=1)
        s01 = np.cov(np.vstack([negative_a, negative_b]), ddof=1)
        covariance = s10 / m + s01 / n
        variance_difference = float(
            (positive_a - positive_b).var(ddof=1) / m + (negative_a - negative_b).var(ddof=1) / n
        )
    else:
        covariance = _clustered_covariance(codes, y, [(positive_a, negative_a), (positive_b, negative_b)])
        # Of the placement differences directly, as above, so identical rankings give exactly 0.
        variance_difference = float(
            _clustered_covariance(codes, y, [(positive_a - positive_b, negative_a - negative_b)])[0, 0]
        )
    standard_error = math.sqrt(max(variance_difference, 0.0))
    if standard_error > 0.0:
        z = difference / standard_error
        # erfc keeps precision in the far tail, where 1 - cdf would round to 0.
        p_value = math.erfc(abs(z) / math.sqrt(2.0))
    elif difference == 0.0:
        z, p_value = 0.0, 1.0
    else:
        z, p_value = math.copysign(math.inf, difference), 0.0

    return DeLongResult(
        auc_a=auc_a,
        auc_b=auc_b,
        difference=difference,
        covariance=(
            (float(covariance[0, 0]), float(covariance[0, 1])),
            (float(covariance[1, 0]), float(covariance[1, 1])),
        ),
        standard_error=standard_error,
        z=z,
        p_value=min(1.0, p_value),
        n_positive=m,
        n_negative=n,
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjustment for a family of tests, in the input order.

    Comparing k models pairwise runs k(k-1)/2 tests; the adjusted p-values
    keep the family-wise error rate at the nominal level without assuming
    the tests are independent.
    """
    count = len(p_values)
    order = sorted(range(count), key=lambda index: p_values[index])
    adjusted = [0.0] * count
    running_max = 0.0
    for step, index in enumerate(order):
        running_max = max(running_max, min(1.0, (count - step) * p_values[index]))
        adjusted[index] = running_max
    return adjusted


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Empirical ROC curve at every distinct score.

    Returns
    -------
    fpr, tpr, thresholds : ndarray
        ``thresholds`` are the distinct scores in decreasing order, preceded
        by ``+inf``; point k is the (FPR, TPR) of calling positive every case
        with ``score >= thresholds[k]``. The curve therefore starts at (0, 0)
        and ends at (1, 1); tied scores give a diagonal step, so the
        trapezoidal area under it equals :func:`auc`.
    """
    y = _binary_labels(labels)
    s = _finite_scores(scores, y.size)
    n_positive, n_negative = _require_both_classes(y)
    order = np.argsort(-s, kind="stable")
    sorted_scores, sorted_labels = s[order], y[order]
    # Compared with != rather than np.diff: inf - inf is NaN, not 0.
    last_of_each_score = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), s.size - 1)
    true_positives = np.cumsum(sorted_labels)[last_of_each_score]
    false_positives = last_of_each_score + 1 - true_positives
    fpr = np.concatenate([[0.0], false_positives / n_negative]).astype(np.float64)
    tpr = np.concatenate([[0.0], true_positives / n_positive]).astype(np.float64)
    thresholds = np.concatenate([[np.inf], sorted_scores[last_of_each_score]]).astype(np.float64)
    return fpr, tpr, thresholds


# ---------------------------------------------------------------- operating point


def mean_ci(
    values: npt.ArrayLike,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: npt.ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a mean (e.g. per-image Dice).

    Returns (nan, nan) for an empty input, whose mean is undefined. NaN values
    propagate; drop undefined values first (as the segmentation report does).
    With ``clusters``, whole clusters are resampled (see :func:`bootstrap_ci`).
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    codes = _cluster_codes(clusters, v.size)
    if codes is None:
        means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    else:
        # Cluster sums and sizes: the mean of a resample is the ratio of their totals.
        sums = np.bincount(codes, weights=v)
        sizes = np.bincount(codes).astype(np.float64)
        draws = rng.integers(0, sums.size, (resamples, sums.size))
        means = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def cluster_bootstrap_ci(
    statistic: Callable[[IntArray], float],
    clusters: npt.ArrayLike,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of any statistic of a set of cases, resampling whole clusters.

    For statistics that no closed form above covers (a FROC curve's
    sensitivity at a number of false positives per image): every resample
    draws as many clusters as there are, with replacement, and hands
    ``statistic`` the indices of their cases (a case drawn twice appears
    twice). A resample whose statistic is undefined (NaN) is left out.

    Parameters
    ----------
    statistic : callable
        Indices of the resampled cases -> the statistic.
    clusters : array_like
        One cluster key per case (e.g. the patient of each image); each case its own key for case resampling.
    resamples, seed, level
        As for :func:`bootstrap_ci`.

    Returns
    -------
    tuple of float
        (low, high); (nan, nan) when there are no cases or no resample was defined.
    """
    codes = _cluster_codes(clusters, len(np.asarray(clusters)))
    if codes is None or codes.size == 0:
        return float("nan"), float("nan")
    members = _cluster_members(codes)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        value = float(statistic(index))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
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
    """Confusion-matrix metrics at one threshold (NaN where the denominator is 0)."""

    threshold: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    accuracy: float


def operating_point(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> OperatingPoint:
    """Sensitivity, specificity, PPV, NPV and accuracy when ``score >= threshold`` is called positive.

    A ratio whose denominator is 0 (e.g. sensitivity without positives, PPV
    when nothing is called positive) is NaN, never a made-up 0 or 1.
    """
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


# ---------------------------------------------------------------- calibration


def brier_score(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """Mean squared error of predicted probabilities against 0/1 outcomes (Brier 1950).

    0 is perfect; always predicting the prevalence p scores p (1 - p).

    References
    ----------
    G. W. Brier, "Verification of forecasts expressed in terms of probability",
    Monthly Weather Review 78(1):1-3, 1950.
    """
    y = _binary_labels(labels)
    p = _probabilities(probabilities, y.size)
    if y.size == 0:
        raise ValueError("brier_score needs at least one case")
    return float(np.mean((p - y) ** 2))


@dataclass(frozen=True, eq=False)
class ReliabilityCurve:
    """Observed outcome frequency against mean predicted probability, per probability bin.

    Bins are equal-width on [0, 1]; bin k holds ``edges[k] <= p < edges[k+1]``
    (computed as ``floor(p * bins)``), the last bin also holds p = 1.

    Attributes
    ----------
    bin_edges : ndarray, shape (bins + 1,)
    mean_predicted : ndarray, shape (bins,)
        Mean predicted probability of the cases in each bin; NaN for an empty bin.
    observed_fraction : ndarray, shape (bins,)
        Fraction of positive cases in each bin; NaN for an empty bin.
    counts : ndarray of int, shape (bins,)
        Cases per bin; 0 marks an empty bin.
    """

    bin_edges: FloatArray
    mean_predicted: FloatArray
    observed_fraction: FloatArray
    counts: IntArray

    @property
    def populated(self) -> BoolArray:
        """Mask of the bins holding at least one case (plot and weigh only these)."""
        return np.asarray(self.counts > 0, dtype=np.bool_)

    @property
    def expected_calibration_error(self) -> float:
        """Count-weighted mean of |observed - predicted| over populated bins (Naeini et al. 2015)."""
        filled = self.populated
        weights = self.counts[filled] / self.counts.sum()
        gaps = np.abs(self.observed_fraction[filled] - self.mean_predicted[filled])
        return float(np.sum(weights * gaps))


def reliability_curve(labels: npt.ArrayLike, probabilities: npt.ArrayLike, bins: int = 10) -> ReliabilityCurve:
    """Reliability (calibration) curve with ``bins`` equal-width probability bins.

    Empty bins are kept, with count 0 and NaN means, so that bin k always
    covers the same probability range; use :attr:`ReliabilityCurve.populated`
    to drop them.
    """
    if bins < 1:
        raise ValueError("bins must be at least 1")
    y = _binary_labels(labels)
    p = _probabilities(probabilities, y.size)
    if y.size == 0:
        raise ValueError("reliability_curve needs at least one case")
    bin_index = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(bin_index, minlength=bins).astype(np.int64)
    predicted_sums = np.bincount(bin_index, weights=p, minlength=bins)
    positive_sums = np.bincount(bin_index, weights=y.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(counts > 0, predicted_sums / counts, np.nan)
        observed_fraction = np.where(counts > 0, positive_sums / counts, np.nan)
    curve = ReliabilityCurve(
        bin_edges=np.linspace(0.0, 1.0, bins + 1),
        mean_predicted=mean_predicted.astype(np.float64),
        observed_fraction=observed_fraction.astype(np.float64),
        counts=counts,
    )
    for array in (curve.bin_edges, curve.mean_predicted, curve.observed_fraction, curve.counts):
        array.flags.writeable = False
    return curve


def expected_calibration_error(labels: npt.ArrayLike, probabilities: npt.ArrayLike, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width bins (Naeini, Cooper & Hauskrecht 2015).

    ``sum_k (n_k / N) |observed_k - mean_predicted_k|``. Depends on the binning;
    report the number of bins with it.
    """
    return reliability_curve(labels, probabilities, bins).expected_calibration_error


# ---------------------------------------------------------------- segmentation


def dice(prediction: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient of two binary masks; two empty masks agree perfectly (1.0)."""
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * float((prediction & truth).sum()) / total


def _same_shape_masks(pred_mask: npt.ArrayLike, true_mask: npt.ArrayLike) -> tuple[BoolArray, BoolArray]:
    predicted = np.asarray(pred_mask, dtype=bool)
    truth = np.asarray(true_mask, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {truth.shape}")
    return predicted, truth


def iou(pred_mask: npt.ArrayLike, true_mask: npt.ArrayLike) -> float:
    """Intersection over union (Jaccard index) of two binary masks.

    Two empty masks agree perfectly and give 1.0, the same convention as
    :func:`dice` (so IoU = Dice / (2 - Dice) holds everywhere).
    """
    predicted, truth = _same_shape_masks(pred_mask, true_mask)
    union = int((predicted | truth).sum())
    if union == 0:
        return 1.0
    return float((predicted & truth).sum()) / union


def _surface(mask: BoolArray) -> BoolArray:
    """Foreground pixels with a face-connected background neighbour (outside the image counts as background)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = np.asarray(ndimage.binary_erosion(mask, structure=structure, border_value=0), dtype=bool)
    return np.asarray(mask & ~eroded, dtype=np.bool_)


def hausdorff95(pred_mask: npt.ArrayLike, true_mask: npt.ArrayLike, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two masks.

    Parameters
    ----------
    pred_mask, true_mask : array_like of bool
        Masks of the same shape (2-D or N-D).
    spacing : sequence of float
        Pixel size along each array axis, in the order of the axes; for 2-D
        images (row spacing, column spacing), which is the order of DICOM
        PixelSpacing. The default (1, 1) gives pixels; pass mm for mm.

    Returns
    -------
    float
        ``max(P95(d(A -> B)), P95(d(B -> A)))`` where d(A -> B) are the
        Euclidean distances from each surface pixel of A to the nearest surface
        pixel of B, and P95 the 95th percentile with linear interpolation. This
        is MONAI's ``compute_hausdorff_distance(percentile=95)`` (directed
        percentiles, then the larger); MedPy's ``hd95`` takes one percentile
        of both directions pooled, which comes out smaller. A surface pixel is a
        foreground pixel with a face-connected neighbour in the background.

        NaN when either mask (or both) is empty: a distance to a surface that
        does not exist is undefined. Report those cases separately (Dice and
        IoU still score them) rather than substituting an arbitrary number.

    Notes
    -----
    Uses Euclidean distance transforms (scipy.ndimage), O(pixels), rather than
    pairwise distances between surface pixels.
    """
    from scipy import ndimage

    predicted, truth = _same_shape_masks(pred_mask, true_mask)
    sampling = tuple(float(value) for value in spacing)
    if len(sampling) != predicted.ndim:
        raise ValueError(f"spacing has {len(sampling)} values for {predicted.ndim}-D masks")
    if not predicted.any() or not truth.any():
        return float("nan")
    predicted_surface, true_surface = _surface(predicted), _surface(truth)
    # distance_transform_edt gives each nonzero pixel's distance to the nearest zero,
    # so invert: zeros on the other mask's surface.
    distance_to_true = np.asarray(ndimage.distance_transform_edt(~true_surface, sampling=sampling), dtype=np.float64)
    distance_to_predicted = np.asarray(
        ndimage.distance_transform_edt(~predicted_surface, sampling=sampling), dtype=np.float64
    )
    forward = float(np.percentile(distance_to_true[predicted_surface], 95))
    backward = float(np.percentile(distance_to_predicted[true_surface], 95))
    return max(forward, backward)
