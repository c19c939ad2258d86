"""Evaluation reports, Markdown tables and plots on small synthetic sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.report import (
    CasePrediction,
    SegmentationRow,
    classification_report,
    compare_families,
    format_estimate,
    report_markdown,
    segmentation_report,
)
from models.evaluation.stats import auc, delong_test, operating_point

RESAMPLES = 200  # enough to exercise the bootstrap; keeps the tests fast


def _synthetic_cases(seed: int = 0, separation: float = 1.5) -> list[CasePrediction]:
    """Two datasets x two devices with both classes, plus a device that only saw negatives."""
    rng = np.random.default_rng(seed)
    cases: list[CasePrediction] = []
    for index in range(160):
        label = int(rng.integers(0, 2))
        score = 1.0 / (1.0 + math.exp(-rng.normal(separation * (label - 0.5), 1.0)))
        cases.append(
            CasePrediction(
                case_id=f"case-{index:03d}",
                dataset="busi" if index % 2 else "busbra",
                device="Toshiba" if index % 4 < 2 else "GE",
                label=label,
                score=score,
            )
        )
    for index in range(6):
        cases.append(CasePrediction(f"solo-{index}", "busbra", "Solo", 0, 0.1 + 0.05 * index))
    return cases


def test_classification_report_overall_and_subgroups() -> None:
    cases = _synthetic_cases()
    report = classification_report(cases, threshold=0.5, resamples=RESAMPLES, seed=1)
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN anywhere

    overall = report["all"]
    labels = [case.label for case in cases]
    scores = [case.score for case in cases]
    assert overall["n"] == len(cases)
    assert overall["n_positive"] == sum(labels)
    assert overall["auc"] == pytest.approx(auc(labels, scores))
    low, high = overall["auc_ci"]
    assert low < overall["auc"] < high
    point = operating_point(labels, scores, 0.5)
    assert overall["sensitivity"] == pytest.approx(point.sensitivity)
    assert overall["npv"] == pytest.approx(point.npv)
    assert 0.0 < overall["brier"] < 0.25
    assert 0.0 <= overall["ece"] < 0.5
    assert overall["note"] is None

    assert set(report["by_dataset"]) == {"busbra", "busi"}
    assert set(report["by_device"]) == {"GE", "Solo", "Toshiba"}
    assert sum(group["n"] for group in report["by_dataset"].values()) == len(cases)
    assert sum(group["n"] for group in report["by_device"].values()) == len(cases)
    busi = [case for case in cases if case.dataset == "busi"]
    assert report["by_dataset"]["busi"]["auc"] == pytest.approx(
        auc([case.label for case in busi], [case.score for case in busi])
    )


def test_single_class_subgroup_gets_a_note_not_a_crash() -> None:
    report = classification_report(_synthetic_cases(), threshold=0.5, resamples=RESAMPLES)
    solo = report["by_device"]["Solo"]
    assert (solo["n"], solo["n_positive"]) == (6, 0)
    assert solo["auc"] is None and solo["auc_ci"] is None
    assert solo["sensitivity"] is None  # no positives: undefined, not 0
    assert solo["specificity"] == 1.0  # all scores below 0.5
    assert "only negative cases" in solo["note"]
    assert solo["brier"] == pytest.approx(np.mean(np.square([0.1 + 0.05 * i for i in range(6)])))


def test_classification_report_refuses_duplicates_and_bad_rows() -> None:
    cases = _synthetic_cases()
    with pytest.raises(ValueError, match="duplicate case_id"):
        classification_report(cases + cases[:1], threshold=0.5, resamples=RESAMPLES)
    with pytest.raises(ValueError, match="probability"):
        CasePrediction("x", "d", "s", 1, 1.5)
    with pytest.raises(ValueError, match="label"):
        CasePrediction("x", "d", "s", 2, 0.5)


def test_compare_families_on_common_cases() -> None:
    strong = _synthetic_cases(seed=0, separation=3.0)
    # Same cases and labels, noisier scores; one family misses the first 20 cases.
    rng = np.random.default_rng(9)
    weak = [
        CasePrediction(
            case.case_id, case.dataset, case.device, case.label, float(np.clip(case.score + rng.normal(0, 0.35), 0, 1))
        )
        for case in strong
    ]
    partial = strong[20:]
    comparisons = compare_families({"strong": strong, "weak": weak, "partial": partial})
    json.dumps(comparisons, allow_nan=False)
    assert [(entry["family_a"], entry["family_b"]) for entry in comparisons] == [
        ("strong", "weak"),
        ("strong", "partial"),
        ("weak", "partial"),
    ]
    assert [entry["n_common"] for entry in comparisons] == [len(strong), len(partial), len(partial)]

    first = comparisons[0]
    expected = delong_test(
        [case.label for case in strong], [case.score for case in strong], [case.score for case in weak]
    )
    assert first["p_value"] == pytest.approx(expected.p_value)
    assert first["difference"] == pytest.approx(expected.difference)
    assert first["difference"] > 0 and first["p_value"] < 0.05
    # strong vs a subset of itself: identical scores on the common cases.
    assert comparisons[1]["p_value"] == 1.0 and comparisons[1]["z"] == 0.0
    # Holm over three tests: the smallest p is multiplied by 3.
    smallest = min(comparisons, key=lambda entry: entry["p_value"])
    assert smallest["p_value_holm"] == pytest.approx(min(1.0, 3 * smallest["p_value"]))
    # Against one reference only: the two pairs that include it, Holm over those two.
    against = compare_families({"strong": strong, "weak": weak, "partial": partial}, reference="weak")
    assert [(entry["family_a"], entry["family_b"]) for entry in against] == [("strong", "weak"), ("weak", "partial")]
    assert against[0]["p_value"] == pytest.approx(expected.p_value)
    assert min(e["p_value_holm"] for e in against) == pytest.approx(min(1.0, 2 * min(e["p_value"] for e in against)))


def test_compare_families_reports_untestable_pairs_and_label_conflicts() -> None:
    a = [CasePrediction(f"c{i}", "d", "s", i % 2, 0.1 * i) for i in range(8)]
    b = [CasePrediction(f"c{i}", "d", "s", i % 2, 0.1 * (8 - i)) for i in range(3)]  # 1 positive in common
    entry = compare_families({"a": a, "b": b})[0]
    assert entry["n_common"] == 3 and entry["p_value"] is None
    assert "at least 2 positive" in entry["note"]
    conflicting = [CasePrediction(case.case_id, case.dataset, case.device, 1 - case.label, case.score) for case in a]
    with pytest.raises(ValueError, match="disagree on the label of 8"):
        compare_families({"a": a, "flipped": conflicting})


def _segmentation_rows() -> list[SegmentationRow]:
    return [
        SegmentationRow("c1", "busi", "GE", 0.8, 0.8 / 1.2, 4.0),
        SegmentationRow("c2", "busi", "GE", 0.6, 0.6 / 1.4, 8.0),
        SegmentationRow("c3", "busi", "Toshiba", 0.0, 0.0, math.nan),  # missed lesion: empty prediction
        SegmentationRow("c4", "busbra", "Toshiba", 0.9, 0.9 / 1.1, 2.0),
    ]


def test_segmentation_report_means_and_undefined_hd95() -> None:
    report = segmentation_report(_segmentation_rows(), resamples=RESAMPLES, distance_unit="mm")
    json.dumps(report, allow_nan=False)
    overall = report["all"]
    assert overall["n"] == 4
    assert overall["dice"]["mean"] == pytest.approx((0.8 + 0.6 + 0.0 + 0.9) / 4)
    assert overall["dice"]["n_undefined"] == 0
    assert overall["hd95"]["mean"] == pytest.approx((4.0 + 8.0 + 2.0) / 3)
    assert overall["hd95"]["median"] == pytest.approx(4.0)
    assert (overall["hd95"]["n_defined"], overall["hd95"]["n_undefined"]) == (3, 1)
    low, high = overall["dice"]["ci"]
    assert low <= overall["dice"]["mean"] <= high
    toshiba = report["by_device"]["Toshiba"]
    assert (toshiba["n"], toshiba["hd95"]["n_undefined"], toshiba["hd95"]["mean"]) == (2, 1, 2.0)
    # One image: a mean but no interval (a bootstrap of one value has zero width).
    busbra = report["by_dataset"]["busbra"]["dice"]
    assert busbra["mean"] == pytest.approx(0.9) and busbra["ci"] is None
    # A subgroup where no HD95 is defined has no mean rather than NaN.
    only_missed = segmentation_report([("c3", "busi", "Toshiba", 0.0, 0.0, math.nan)], resamples=RESAMPLES)
    assert only_missed["all"]["hd95"]["mean"] is None and only_missed["all"]["hd95"]["n_undefined"] == 1


def test_markdown_tables() -> None:
    assert format_estimate(0.8642, [0.8301, 0.8968]) == "0.864 (0.830–0.897)"
    assert format_estimate(None) == "n/a"
    cases = _synthetic_cases()
    classification = classification_report(cases, threshold=0.5, resamples=RESAMPLES)
    comparisons = compare_families({"a": cases, "b": cases[10:]})
    segmentation = segmentation_report(_segmentation_rows(), resamples=RESAMPLES)
    text = report_markdown(classification, comparisons, segmentation, title="Test set")
    assert text.startswith("## Test set")
    overall = classification["all"]
    assert (
        f"| All | {overall['n']} | {overall['n_positive']} | {format_estimate(overall['auc'], overall['auc_ci'])} |"
        in text
    )
    assert "| Device: Solo | 6 | 0 | n/a |" in text
    assert "- Device: Solo: only negative cases" in text
    assert "| a | b | 156 |" in text
    assert "### Segmentation" in text and "| All | 4 |" in text
    # Every table row has the same number of cells as its header.
    for table in text.split("\n\n"):
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert len({row.count("|") for row in rows}) <= 1, table


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("matplotlib")
    from models.evaluation.plots import save_reliability_png, save_roc_png

    cases = _synthetic_cases()
    everything = ([case.label for case in cases], [case.score for case in cases])
    solo = [case for case in cases if case.device == "Solo"]
    curves = {
        "all": everything,
        "busi": ([c.label for c in cases if c.dataset == "busi"], [c.score for c in cases if c.dataset == "busi"]),
        "Solo (one class)": ([c.label for c in solo], [c.score for c in solo]),
    }
    roc = save_roc_png(tmp_path / "plots" / "roc.png", curves)
    reliability = save_reliability_png(tmp_path / "reliability.png", curves)
    for path in (roc, reliability):
        assert path.stat().st_size > 10_000
        image = cv2.imread(str(path))
        assert image is not None
        assert image.shape[:2] == (500, 500)
        assert image.std() > 10  # not a blank canvas


def test_reports_count_a_patient_once_however_many_images_it_has() -> None:
    rng = np.random.default_rng(11)
    labels = (rng.random(90) < 0.45).astype(int)
    a = 1 / (1 + np.exp(-(labels * 1.5 + rng.normal(size=90))))
    b = 1 / (1 + np.exp(-(labels * 1.0 + rng.normal(size=90))))

    def cases(scores: np.ndarray, copies: int) -> list[CasePrediction]:
        return [
            CasePrediction(
                f"img{i}-{k}", "d", "s", int(labels[i]), float(scores[i]), f"patient{i:03d}" if copies > 1 else ""
            )
            for i in range(90)
            for k in range(copies)
        ]

    once = compare_families({"a": cases(a, 1), "b": cases(b, 1)})[0]
    twice = compare_families({"a": cases(a, 2), "b": cases(b, 2)})[0]
    assert twice["n_common"] == 180 and twice["p_value"] == pytest.approx(once["p_value"], rel=1e-8)
    report_once = classification_report(cases(a, 1), threshold=0.5, resamples=200)
    report_twice = classification_report(cases(a, 2), threshold=0.5, resamples=200)
    assert report_twice["all"]["auc"] == pytest.approx(report_once["all"]["auc"])
    # Same resampled patients, so the same interval (clusters are coded in the order of their keys).
    assert report_twice["all"]["auc_ci"] == pytest.approx(report_once["all"]["auc_ci"])


def test_per_patient_pools_each_patients_images_by_mean_log_odds() -> None:
    from models.evaluation.report import per_patient

    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    cases = [
        # busbra: three patients with two views each, one patient whose views disagree on the label (two lesions)
        CasePrediction("p1-l", "busbra", "GE", 1, 0.9, "busbra-1"),
        CasePrediction("p1-r", "busbra", "GE", 1, 0.4, "busbra-1"),
        CasePrediction("p2-l", "busbra", "GE", 0, 0.6, "busbra-2"),
        CasePrediction("p2-r", "busbra", "Toshiba", 0, 0.2, "busbra-2"),
        CasePrediction("p3-l", "busbra", "GE", 1, 0.7, "busbra-3"),
        CasePrediction("p3-r", "busbra", "GE", 1, 0.5, "busbra-3"),
        CasePrediction("p4-l", "busbra", "GE", 1, 0.8, "busbra-4"),
        CasePrediction("p4-r", "busbra", "GE", 0, 0.3, "busbra-4"),
        # busi: one image per patient, so pooling changes nothing there
        CasePrediction("b1", "busi", "busi", 0, 0.35, "busi-b1"),
        CasePrediction("b2", "busi", "busi", 1, 0.45, "busi-b2"),
    ]
    pooled, mixed = per_patient(cases)
    assert mixed == 1 and [c.case_id for c in pooled] == ["busbra-1", "busbra-2", "busbra-3", "busi-b1", "busi-b2"]
    by_id = {c.case_id: c for c in pooled}
    expected = 1 / (1 + math.exp(-(logit(0.9) + logit(0.4)) / 2))  # 0.7101
    assert by_id["busbra-1"].score == pytest.approx(expected) and by_id["busbra-1"].label == 1
    assert (
        by_id["busbra-2"].device == "mixed"
        and by_id["busbra-2"].dataset == "busbra"
        and by_id["busbra-1"].cluster == ""
    )

    report = classification_report(cases, threshold=0.5, resamples=RESAMPLES)
    patients = report["per_patient"]
    assert (
        patients["left_out_mixed_labels"] == 1
        and patients["all"]["n"] == 5
        and set(patients["by_dataset"]) == {"busbra"}
    )
    # busbra per patient: positives 0.710 (p1) and 0.604 (p3) against the negative 0.380 (p2): AUC 1
    assert patients["by_dataset"]["busbra"]["auc"] == pytest.approx(1.0) and report["by_dataset"]["busbra"]["auc"] < 1.0
    # all patients: positives 0.710, 0.604, 0.45 against negatives 0.380, 0.35: every pair ordered, AUC 1
    assert patients["all"]["auc"] == pytest.approx(1.0)
    text = report_markdown(classification=report)
    assert (
        "| All, per patient | 5 | 3 |" in text
        and "| Dataset: busbra, per patient | 3 | 2 |" in text
        and "1 patient(s) with images of both labels" in text
    )
    # one image per patient: no per-patient section at all; nor where images of one patient are not views of one lesion
    assert "per_patient" not in classification_report(
        [c for c in cases if c.dataset == "busi"], threshold=0.5, resamples=RESAMPLES
    )
    assert "per_patient" not in classification_report(cases, threshold=0.5, resamples=RESAMPLES, pool_patients=False)


def test_per_patient_ranks_by_mean_log_odds_not_mean_probability_and_clips_certainty() -> None:
    from models.evaluation.report import per_patient

    cases = [
        # a: one confident view and one doubtful one; b: two middling views. Mean probability ranks b over a (0.595
        # against 0.7); mean log-odds ranks a over b (sigmoid((4.595 - 1.386) / 2) = 0.833 against 0.7).
        CasePrediction("a1", "views", "s", 1, 0.99, "a"),
        CasePrediction("a2", "views", "s", 1, 0.2, "a"),
        CasePrediction("b1", "views", "s", 0, 0.7, "b"),
        CasePrediction("b2", "views", "s", 0, 0.7, "b"),
        # c: a score of exactly 1 is clipped to 1 - 1e-6 before its log-odds, so the mean stays finite
        CasePrediction("c1", "views", "s", 1, 1.0, "c"),
        CasePrediction("c2", "views", "s", 1, 0.5, "c"),
        CasePrediction("d1", "views", "s", 0, 0.1, "d"),
        CasePrediction("d2", "views", "s", 0, 0.3, "d"),
    ]
    pooled = {c.case_id: c.score for c in per_patient(cases)[0]}
    assert pooled["a"] == pytest.approx(1 / (1 + math.exp(-(math.log(99) + math.log(0.25)) / 2)))
    assert pooled["b"] == pytest.approx(0.7)
    assert pooled["c"] == pytest.approx(1 / (1 + math.exp(-math.log((1 - 1e-6) / 1e-6) / 2)))
    report = classification_report(cases, threshold=0.5, resamples=RESAMPLES)["per_patient"]
    assert report["all"]["auc"] == pytest.approx(1.0)  # a mean of probabilities would put b above a: 0.75
    # four independent patients: the interval resamples patients, not images
    assert report["all"]["n"] == 4 and report["all"]["auc_ci"] is not None and len(report["all"]["auc_ci"]) == 2
