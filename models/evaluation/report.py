"""Evaluation reports: per-subgroup statistics, model comparisons and model-card tables.

Builds JSON-serialisable dictionaries from per-case predictions (what
``breastai evaluate`` writes) and renders them as Markdown tables for model
cards. The statistics themselves live in :mod:`models.evaluation.stats`.

Every estimate comes with its uncertainty and its sample size, subgroups are
reported separately (dataset, acquisition device), and a statistic that is
undefined for a subgroup is reported as ``None`` with a note rather than
replaced by a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, NamedTuple

import numpy as np

from models.evaluation.stats import (
    auc,
    bootstrap_ci,
    brier_score,
    delong_test,
    holm_adjust,
    mean_ci,
    operating_point,
    reliability_curve,
)

JsonDict = dict[str, Any]

# Below this many cases of a class, bootstrap intervals are wide and their
# coverage is poor; the report says so next to the numbers.
SMALL_CLASS_COUNT = 10


@dataclass(frozen=True)
class CasePrediction:
    """One case's model output and ground truth.

    Attributes
    ----------
    case_id : str
        Identifier shared by all models' predictions for the same case (used
        to pair cases in :func:`compare_families`); unique within one model.
    dataset : str
        Source dataset, for per-dataset subgroups.
    device : str
        Acquisition device (scanner manufacturer/model), for per-device subgroups.
    label : int
        Ground truth, 1 positive (e.g. malignant) or 0 negative.
    score : float
        Predicted probability of the positive class, in [0, 1].
    cluster : str
        The patient (or other unit whose cases are not independent, e.g. a
        group of near-duplicate images); "" for a case that is its own. The
        bootstrap resamples clusters and DeLong uses Obuchowski's clustered
        covariance whenever any case names one.
    """

    case_id: str
    dataset: str
    device: str
    label: int
    score: float
    cluster: str = ""

    def __post_init__(self) -> None:
        # Fail at construction, where the bad row is known, not deep inside a bootstrap.
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label!r}")
        if not (math.isfinite(self.score) and 0.0 <= self.score <= 1.0):
            raise ValueError(f"score must be a probability in [0, 1], got {self.score!r}")


class SegmentationRow(NamedTuple):
    """One image's segmentation metrics; hd95 is NaN where undefined (an empty mask); cluster as in
    :class:`CasePrediction`.
    """

    case_id: str
    dataset: str
    device: str
    dice: float
    iou: float
    hd95: float
    cluster: str = ""


def _clusters(cases: Sequence[CasePrediction] | Sequence[SegmentationRow]) -> list[str] | None:
    """Each case's cluster (itself where it names none), or None when no case names one."""
    if not any(case.cluster for case in cases):
        return None
    return [case.cluster or f"case:{case.case_id}" for case in cases]


def _json_number(value: float) -> float | None:
    """NaN and inf are not JSON; an undefined metric is written as null."""
    return float(value) if math.isfinite(value) else None


def _unique_case_ids(cases: Sequence[CasePrediction], owner: str) -> None:
    seen: set[str] = set()
    duplicates = 0
    for case in cases:
        duplicates += case.case_id in seen
        seen.add(case.case_id)
    if duplicates:
        # Counted, not listed: case ids may be accession numbers.
        raise ValueError(f"{owner}: {duplicates} duplicate case_id(s); each case must be counted once")


def _grouped(cases: Sequence[CasePrediction], key: Callable[[CasePrediction], str]) -> dict[str, list[CasePrediction]]:
    groups: dict[str, list[CasePrediction]] = {}
    for case in cases:
        groups.setdefault(key(case), []).append(case)
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------- classification


PROBABILITY_CLIP = 1e-6


def per_patient(cases: Sequence[CasePrediction]) -> tuple[list[CasePrediction], int]:
    """One prediction per patient (cluster): the mean log-odds of its images' scores, and how many were left out.

    A patient's images are pooled only where they all carry one label (BUS-BRA's
    two views of its one biopsied tumour; a group of near-duplicate scans);
    a patient whose images disagree holds several lesions and is left out,
    counted. The pooled case takes the patient's dataset and device where
    its images share them ("mixed" otherwise) and is its own cluster.
    """
    patients = _grouped(cases, lambda case: case.cluster or f"case:{case.case_id}")
    pooled: list[CasePrediction] = []
    mixed = 0
    for patient, images in patients.items():
        if len({image.label for image in images}) > 1:
            mixed += 1
            continue
        clipped = np.clip([image.score for image in images], PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
        mean = float(np.mean(np.log(clipped / (1.0 - clipped))))
        datasets, devices = {image.dataset for image in images}, {image.device for image in images}
        pooled.append(
            CasePrediction(
                patient,
                datasets.pop() if len(datasets) == 1 else "mixed",
                devices.pop() if len(devices) == 1 else "mixed",
                images[0].label,
                float(1.0 / (1.0 + math.exp(-mean))),
            )
        )
    return pooled, mixed


def _classification_group(
    cases: Sequence[CasePrediction], threshold: float, resamples: int, seed: int, level: float, calibration_bins: int
) -> JsonDict:
    labels = np.array([case.label for case in cases], dtype=np.int64)
    scores = np.array([case.score for case in cases], dtype=np.float64)
    n_positive = int(labels.sum())
    n_negative = int(labels.size - n_positive)
    point = operating_point(labels, scores, threshold)
    curve = reliability_curve(labels, scores, calibration_bins)
    notes: list[str] = []
    area: float | None = None
    interval: list[float] | None = None
    if n_positive and n_negative:
        area = auc(labels, scores)
        interval = list(
            bootstrap_ci(labels, scores, resamples=resamples, seed=seed, level=level, clusters=_clusters(cases))
        )
        if min(n_positive, n_negative) < SMALL_CLASS_COUNT:
            notes.append(
                f"fewer than {SMALL_CLASS_COUNT} cases of one class "
                f"({n_positive} positive, {n_negative} negative): the interval is unreliable"
            )
    else:
        present = "positive" if n_positive else "negative"
        missing = "sensitivity" if not n_positive else "specificity"
        notes.append(f"only {present} cases: AUC and {missing} are undefined")
    return {
        "n": int(labels.size),
        "n_positive": n_positive,
        "n_negative": n_negative,
        "auc": area,
        "auc_ci": interval,
        "sensitivity": _json_number(point.sensitivity),
        "specificity": _json_number(point.specificity),
        "ppv": _json_number(point.ppv),
        "npv": _json_number(point.npv),
        "accuracy": _json_number(point.accuracy),
        "brier": brier_score(labels, scores),
        "ece": curve.expected_calibration_error,
        "note": "; ".join(notes) if notes else None,
    }


def classification_report(
    cases: Sequence[CasePrediction],
    threshold: float,
    resamples: int = 1000,
    seed: int = 0,
    *,
    level: float = 0.95,
    calibration_bins: int = 10,
    pool_patients: bool = True,
) -> JsonDict:
    """Discrimination, operating-point and calibration statistics, overall and per subgroup.

    Parameters
    ----------
    cases : sequence of CasePrediction
        One prediction per case (duplicate case ids are refused).
    threshold : float
        Operating point: ``score >= threshold`` is called positive. Choose it
        on validation data, never on the cases reported here.
    resamples, seed, level : int, int, float
        Percentile bootstrap of the AUC over cases (Efron & Tibshirani 1993),
        or over clusters where the cases name them (:class:`CasePrediction`).
    calibration_bins : int
        Equal-width bins of the expected calibration error.
    pool_patients : bool
        Whether a patient's images may be read as views of one lesion, so
        that the per-patient summary below means something: true for
        ultrasound (BUS-BRA's ``case`` is its one biopsied tumour; a group of
        near-duplicate scans is one scan), false for mini-MIAS, whose
        patient is a woman with findings in either breast.

    Returns
    -------
    dict
        JSON-serialisable: ``{"threshold", "level", "resamples", "seed",
        "calibration_bins", "resampled" (cases or patients), "all": group, "by_dataset": {name: group},
        "by_device": {name: group}}``, where a group holds ``n``,
        ``n_positive``, ``n_negative``, ``auc``, ``auc_ci`` ([low, high]),
        ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``accuracy``,
        ``brier`` (Brier 1950), ``ece`` and ``note``. Undefined values are
        None (e.g. AUC of a one-class subgroup, PPV with no positive calls)
        and ``note`` says why; otherwise ``note`` is None. With
        ``pool_patients``, where some patient (cluster) has several images,
        also ``"per_patient"``: ``{"rule",
        "left_out_mixed_labels", "all": group, "by_dataset": {name: group}}``
        over one score per patient (:func:`per_patient`), its datasets only
        where pooling changed them.
    """
    if not cases:
        raise ValueError("classification_report needs at least one case")
    _unique_case_ids(cases, "classification_report")

    def group(members: Sequence[CasePrediction]) -> JsonDict:
        return _classification_group(members, threshold, resamples, seed, level, calibration_bins)

    report: JsonDict = {
        "threshold": float(threshold),
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "calibration_bins": calibration_bins,
        "resampled": "cases" if _clusters(cases) is None else "patients, each patient's images drawn together",
        "all": group(cases),
        "by_dataset": {name: group(members) for name, members in _grouped(cases, lambda c: c.dataset).items()},
        "by_device": {name: group(members) for name, members in _grouped(cases, lambda c: c.device).items()},
    }
    patients, mixed = per_patient(cases) if pool_patients else ([], len(cases))
    if len(patients) + mixed < len(cases):  # some patient has several images: the per-patient reading differs
        pooled_datasets = {c.dataset for c in patients if c.dataset != "mixed"}
        image_counts = {name: len(members) for name, members in _grouped(cases, lambda c: c.dataset).items()}
        report["per_patient"] = {
            "rule": "mean log-odds of each patient's images, where they share one label",
            "left_out_mixed_labels": mixed,
            "all": group(patients),
            # only the datasets where pooling changed something (a patient with several images)
            "by_dataset": {
                name: group(members)
                for name, members in _grouped(patients, lambda c: c.dataset).items()
                if name in pooled_datasets and len(members) < image_counts.get(name, 0)
            },
        }
    return report


# ---------------------------------------------------------------- model comparison


def compare_families(
    predictions: Mapping[str, Sequence[CasePrediction]], *, level: float = 0.95, reference: str | None = None
) -> list[JsonDict]:
    """Pairwise DeLong tests (DeLong et al. 1988) between model families on their common cases.

    Parameters
    ----------
    predictions : mapping of family name to its case predictions
        Cases are paired by ``case_id``; each pair of families is compared on
        the cases both predicted, so different pairs may use different cases.
    level : float
        Coverage of the Wald interval of the AUC difference.
    reference : str, optional
        Test only the pairs that include this family (each model against one
        reference, e.g. the readers), and Holm-adjust over those.

    Returns
    -------
    list of dict
        One entry per pair, in the mapping's order: ``family_a``,
        ``family_b``, ``level``, ``n_common``, ``n_positive``, ``n_negative``, ``auc_a``,
        ``auc_b``, ``difference`` (a - b), ``difference_ci``, ``variance_a``,
        ``variance_b``, ``covariance``, ``z``, ``p_value`` (two-sided,
        unadjusted), ``p_value_holm`` (Holm 1979 over all pairs tested) and
        ``note`` (why a pair was not tested, else None).

    Raises
    ------
    ValueError
        If a family repeats a case id, or two families disagree on a common
        case's label (their ground truths differ, so the comparison would be
        meaningless).
    """
    by_family: dict[str, dict[str, CasePrediction]] = {}
    for family, cases in predictions.items():
        _unique_case_ids(cases, f"family {family!r}")
        by_family[family] = {case.case_id: case for case in cases}

    results: list[JsonDict] = []
    for family_a, family_b in combinations(by_family, 2):
        if reference is not None and reference not in (family_a, family_b):
            continue
        cases_a, cases_b = by_family[family_a], by_family[family_b]
        common = sorted(cases_a.keys() & cases_b.keys())
        disagreeing = sum(cases_a[case_id].label != cases_b[case_id].label for case_id in common)
        if disagreeing:
            raise ValueError(f"{family_a!r} and {family_b!r} disagree on the label of {disagreeing} common case(s)")
        labels = np.array([cases_a[case_id].label for case_id in common], dtype=np.int64)
        n_positive = int(labels.sum())
        n_negative = int(labels.size - n_positive)
        entry: JsonDict = {
            "family_a": family_a,
            "family_b": family_b,
            "level": level,
            "n_common": len(common),
            "n_positive": n_positive,
            "n_negative": n_negative,
            "auc_a": None,
            "auc_b": None,
            "difference": None,
            "difference_ci": None,
            "variance_a": None,
            "variance_b": None,
            "covariance": None,
            "z": None,
            "p_value": None,
            "p_value_holm": None,
            "note": None,
        }
        clusters = _clusters([cases_a[case_id] for case_id in common])
        positive_units = len({clusters[i] for i in np.flatnonzero(labels == 1)}) if clusters else n_positive
        negative_units = len({clusters[i] for i in np.flatnonzero(labels == 0)}) if clusters else n_negative
        if min(positive_units, negative_units) < 2:
            entry["note"] = (
                f"not tested: DeLong needs at least 2 positive and 2 negative common cases"
                f"{', from 2 patients or more each' if clusters else ''} (got {n_positive} positive, {n_negative} "
                f"negative)"
            )
        else:
            result = delong_test(
                labels,
                [cases_a[case_id].score for case_id in common],
                [cases_b[case_id].score for case_id in common],
                clusters=clusters,
            )
            entry.update(
                auc_a=result.auc_a,
                auc_b=result.auc_b,
                difference=result.difference,
                difference_ci=list(result.difference_ci(level)),
                variance_a=result.variance_a,
                variance_b=result.variance_b,
                covariance=result.covariance[0][1],
                z=_json_number(result.z),
                p_value=result.p_value,
            )
            if min(n_positive, n_negative) < SMALL_CLASS_COUNT:
                entry["note"] = (
                    f"fewer than {SMALL_CLASS_COUNT} common cases of one class: "
                    "the normal approximation of the DeLong test is poor"
                )
        results.append(entry)

    tested = [entry for entry in results if entry["p_value"] is not None]
    for entry, adjusted in zip(tested, holm_adjust([entry["p_value"] for entry in tested]), strict=True):
        entry["p_value_holm"] = adjusted
    return results


# ---------------------------------------------------------------- segmentation


def _mean_summary(
    values: Sequence[float], resamples: int, seed: int, level: float, clusters: Sequence[str] | None = None
) -> JsonDict:
    array = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(array)
    defined = array[finite]
    summary: JsonDict = {
        "mean": None,
        "ci": None,
        "median": None,
        "n_defined": int(defined.size),
        "n_undefined": int(array.size - defined.size),
    }
    if defined.size:
        summary["mean"] = float(defined.mean())
        summary["median"] = float(np.median(defined))
    # Resampling a single value gives a zero-width interval that would look like certainty.
    if defined.size >= 2:
        kept = None if clusters is None else [cluster for cluster, ok in zip(clusters, finite, strict=True) if ok]
        summary["ci"] = list(mean_ci(defined, resamples=resamples, seed=seed, level=level, clusters=kept))
    return summary


def _segmentation_group(rows: Sequence[SegmentationRow], resamples: int, seed: int, level: float) -> JsonDict:
    clusters = _clusters(rows)
    return {
        "n": len(rows),
        "dice": _mean_summary([row.dice for row in rows], resamples, seed, level, clusters),
        "iou": _mean_summary([row.iou for row in rows], resamples, seed, level, clusters),
        "hd95": _mean_summary([row.hd95 for row in rows], resamples, seed, level, clusters),
    }


def segmentation_report(
    rows: Iterable[tuple[str, str, str, float, float, float] | tuple[str, str, str, float, float, float, str]],
    resamples: int = 1000,
    seed: int = 0,
    *,
    level: float = 0.95,
    distance_unit: str = "px",
) -> JsonDict:
    """Mean Dice, IoU and HD95 with percentile-bootstrap intervals, overall and per subgroup.

    Parameters
    ----------
    rows : iterable of (case_id, dataset, device, dice, iou, hd95[, cluster])
        One row per image (:class:`SegmentationRow` or a plain tuple); images
        of one cluster (patient) are resampled together. An
        undefined value (NaN, e.g. HD95 with an empty mask, see
        :func:`models.evaluation.stats.hausdorff95`) is left out of that metric's
        mean and counted in its ``n_undefined``.
    resamples, seed, level : int, int, float
        Percentile bootstrap of each mean over images, or over clusters where rows name them.
    distance_unit : str
        Unit of hd95 ("px" or "mm"), carried into the report.

    Returns
    -------
    dict
        JSON-serialisable: ``{"level", "resamples", "seed", "hd95_unit",
        "all": group, "by_dataset": {...}, "by_device": {...}}``; a group is
        ``{"n", "dice", "iou", "hd95"}`` and each metric
        ``{"mean", "ci", "median", "n_defined", "n_undefined"}`` (mean and
        median None when no value is defined, ci None with fewer than two). HD95 is skewed by a few
        failures, so its median is given next to the mean.
    """
    typed = [SegmentationRow(*row) for row in rows]
    if not typed:
        raise ValueError("segmentation_report needs at least one row")

    def grouped(key: Callable[[SegmentationRow], str]) -> dict[str, JsonDict]:
        groups: dict[str, list[SegmentationRow]] = {}
        for row in typed:
            groups.setdefault(key(row), []).append(row)
        return {name: _segmentation_group(members, resamples, seed, level) for name, members in sorted(groups.items())}

    return {
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "hd95_unit": distance_unit,
        "resampled": "images" if _clusters(typed) is None else "patients, each patient's images drawn together",
        "all": _segmentation_group(typed, resamples, seed, level),
        "by_dataset": grouped(lambda row: row.dataset),
        "by_device": grouped(lambda row: row.device),
    }


# ---------------------------------------------------------------- Markdown


def format_estimate(value: float | None, interval: Sequence[float] | None = None, digits: int = 3) -> str:
    """``0.864 (0.830–0.897)``; ``n/a`` for an undefined value."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if interval is not None:
        text += f" ({interval[0]:.{digits}f}–{interval[1]:.{digits}f})"
    return text


def _format_p(p_value: float | None) -> str:
    if p_value is None:
        return "n/a"
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"


def _cell(text: str) -> str:
    """Table cell text: a '|' in a dataset or device name would split the cell."""
    return text.replace("|", "\\|")


def _subgroups(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    labelled: list[tuple[str, Mapping[str, Any]]] = [("All", report["all"])]
    labelled += [(f"Dataset: {name}", group) for name, group in report["by_dataset"].items()]
    labelled += [(f"Device: {name}", group) for name, group in report["by_device"].items()]
    patients = report.get("per_patient")
    if patients:
        labelled += [("All, per patient", patients["all"])]
        labelled += [(f"Dataset: {name}, per patient", group) for name, group in patients["by_dataset"].items()]
    return labelled


def _classification_markdown(report: Mapping[str, Any]) -> list[str]:
    level = round(100 * report["level"])
    lines = [
        (
            f"Operating point: score ≥ {report['threshold']:.3f}. AUC with {level}% percentile-bootstrap interval "
            f"({report['resamples']} resamples over {report.get('resampled', 'cases')}); ECE over "
            f"{report['calibration_bins']} equal-width bins."
        ),
        "",
        f"| Group | n | Positive | AUC ({level}% CI) | Sensitivity | Specificity | PPV | NPV | Accuracy | Brier | ECE "
        f"|",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes: list[str] = []
    for name, group in _subgroups(report):
        lines.append(
            f"| {_cell(name)} | {group['n']} | {group['n_positive']} | "
            f"{format_estimate(group['auc'], group['auc_ci'])} | "
            + " | ".join(
                format_estimate(group[key])
                for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "brier", "ece")
            )
            + " |"
        )
        if group.get("note"):
            notes.append(f"- {_cell(name)}: {group['note']}")
    patients = report.get("per_patient")
    if patients:
        notes.append(
            "- Per patient: one score per patient, the mean log-odds of its images where they share one label (meant "
            "for several views "
            f"of one lesion, as BUS-BRA's two of its one tumour); {patients['left_out_mixed_labels']} patient(s) with "
            f"images of both labels left out."
        )
    return lines + (["", *notes] if notes else [])


def classification_table(report: Mapping[str, Any]) -> str:
    """The table of one :func:`classification_report` with its notes, without a heading (for sections of their own)."""
    return "\n".join(_classification_markdown(report))


def _comparison_markdown(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    level = round(100 * comparisons[0]["level"])
    lines = [
        "Paired DeLong test on the cases both models predicted; p two-sided, Holm-adjusted over all pairs.",
        "",
        f"| Model A | Model B | n common | AUC A | AUC B | Δ AUC ({level}% CI) | z | p | p (Holm) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    notes: list[str] = []
    for entry in comparisons:
        z = entry["z"]
        lines.append(
            f"| {_cell(entry['family_a'])} | {_cell(entry['family_b'])} | {entry['n_common']} | "
            f"{format_estimate(entry['auc_a'])} | {format_estimate(entry['auc_b'])} | "
            f"{format_estimate(entry['difference'], entry['difference_ci'])} | "
            f"{'n/a' if z is None else f'{z:.2f}'} | {_format_p(entry['p_value'])} | "
            f"{_format_p(entry['p_value_holm'])} |"
        )
        if entry.get("note"):
            notes.append(f"- {_cell(entry['family_a'])} vs {_cell(entry['family_b'])}: {entry['note']}")
    return lines + (["", *notes] if notes else [])


def _segmentation_markdown(report: Mapping[str, Any]) -> list[str]:
    level = round(100 * report["level"])
    unit = report["hd95_unit"]
    lines = [
        (
            f"Means with {level}% percentile-bootstrap intervals ({report['resamples']} resamples over "
            f"{report.get('resampled', 'images')}). "
            "HD95 is undefined (left out) when a mask is empty."
        ),
        "",
        f"| Group | n | Dice ({level}% CI) | IoU ({level}% CI) | HD95 {unit} ({level}% CI) | HD95 median | HD95 "
        f"undefined |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for name, group in _subgroups(report):
        hd95 = group["hd95"]
        lines.append(
            f"| {_cell(name)} | {group['n']} | {format_estimate(group['dice']['mean'], group['dice']['ci'])} | "
            f"{format_estimate(group['iou']['mean'], group['iou']['ci'])} | "
            f"{format_estimate(hd95['mean'], hd95['ci'], digits=2)} | {format_estimate(hd95['median'], digits=2)} | "
            f"{hd95['n_undefined']} |"
        )
    return lines


def report_markdown(
    classification: Mapping[str, Any] | None = None,
    comparisons: Sequence[Mapping[str, Any]] | None = None,
    segmentation: Mapping[str, Any] | None = None,
    *,
    title: str | None = None,
) -> str:
    """Markdown tables for a model card from the outputs of the report functions.

    Parameters
    ----------
    classification : dict, optional
        Output of :func:`classification_report`.
    comparisons : list of dict, optional
        Output of :func:`compare_families`.
    segmentation : dict, optional
        Output of :func:`segmentation_report`.
    title : str, optional
        Level-2 heading above the tables.

    Returns
    -------
    str
        Sections for whichever inputs are given; estimates as
        ``0.864 (0.830–0.897)``, undefined values as ``n/a``, subgroup notes
        listed under each table.
    """
    sections: list[list[str]] = []
    if title:
        sections.append([f"## {title}"])
    if classification is not None:
        sections.append(["### Classification", "", *_classification_markdown(classification)])
    if comparisons:
        sections.append(["### Model comparison", "", *_comparison_markdown(comparisons)])
    if segmentation is not None:
        sections.append(["### Segmentation", "", *_segmentation_markdown(segmentation)])
    return "\n\n".join("\n".join(section) for section in sections) + "\n"
