"""The served B-mode evaluation's pure parts (models.evaluation.served), with hand-computed figures.

Image score = the highest headline probability found (0 where nothing was found), per patient = the highest image
score, normal images as negatives, and the FROC hit rule (IoU >= 0.1 with a ground-truth lesion).
"""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation.command import merged_markdown, report_markdown_of
from models.evaluation.finder import froc_of
from models.evaluation.report import CasePrediction
from models.evaluation.served import (
    BENIGN_VS_MALIGNANT,
    MALIGNANT_VS_REST,
    FoundLesion,
    ServedImage,
    hit_of,
    image_predictions,
    image_score,
    marked_image,
    outline_mask,
    overlaps_with,
    patient_predictions,
    served_markdown,
    served_report,
    truth_lesions,
    with_served,
)

THRESHOLD = 0.5


def _image(
    image_id: str, patient: str, malignant: int | None, *found: tuple[float, float, float], lesions: int = 1
) -> ServedImage:
    """An analysed image; each found lesion as (headline probability, segmenter confidence, IoU with lesion 0)."""
    return ServedImage(
        image_id,
        "set",
        "scanner",
        patient,
        malignant,
        lesions if malignant is not None else 0,
        tuple(FoundLesion(p, c, (overlap,) if malignant is not None else ()) for p, c, overlap in found),
    )


def _six_images() -> list[ServedImage]:
    """Two malignant views of one patient (one where nothing was found), two benign, two normal."""
    return [
        _image("a", "p1", 1, (0.9, 0.9, 0.6)),
        _image("b", "p1", 1),  # nothing found: scores 0, reported as no lesion
        _image("c", "p2", 0, (0.3, 0.8, 0.5)),
        _image("d", "p3", 0, (0.6, 0.7, 0.0)),  # a false region on a benign image
        _image("e", "p4", None, (0.7, 0.6, 0.0)),  # a normal image with a lesion reported
        _image("f", "p5", None),
    ]


def test_the_image_score_is_the_highest_headline_probability_and_0_where_nothing_was_found() -> None:
    assert image_score([0.2, 0.7, 0.4]) == 0.7
    assert image_score([]) == 0.0
    images = _six_images()
    assert [image.score for image in images] == [0.9, 0.0, 0.3, 0.6, 0.7, 0.0]


def test_lesion_images_answer_benign_vs_malignant_and_normals_join_malignant_vs_rest_as_negatives() -> None:
    images = _six_images()
    lesions = image_predictions(images, BENIGN_VS_MALIGNANT)
    assert [(c.case_id, c.label, c.score, c.cluster) for c in lesions] == [
        ("a", 1, 0.9, "p1"),
        ("b", 1, 0.0, "p1"),
        ("c", 0, 0.3, "p2"),
        ("d", 0, 0.6, "p3"),
    ]
    everything = image_predictions(images, MALIGNANT_VS_REST)
    assert [(c.case_id, c.label, c.score) for c in everything][4:] == [("e", 0, 0.7), ("f", 0, 0.0)]
    with pytest.raises(ValueError, match="task must be one of"):
        image_predictions(images, "birads_high")


def test_a_patient_scores_its_highest_image_and_is_malignant_when_any_image_is() -> None:
    cases = [
        CasePrediction("a", "busbra", "GE", 1, 0.2, "p1"),
        CasePrediction("b", "busbra", "GE", 0, 0.8, "p1"),
        CasePrediction("c", "busbra", "Toshiba", 0, 0.4, "p2"),
        CasePrediction("d", "busi", "busi", 0, 0.1, ""),  # no patient named: its own
    ]
    pooled = patient_predictions(cases)
    assert [(c.case_id, c.dataset, c.device, c.label, c.score) for c in pooled] == [
        ("case:d", "busi", "busi", 0, 0.1),
        ("p1", "busbra", "GE", 1, 0.8),
        ("p2", "busbra", "Toshiba", 0, 0.4),
    ]


def test_served_figures_count_misses_as_0_and_reported_normals_as_false_positives() -> None:
    report = served_report(_six_images(), THRESHOLD, resamples=50)
    # Benign vs malignant, lesion images: (0.9, 0) against (0.3, 0.6): 0.9 wins both pairs, 0 loses both.
    bm = report[BENIGN_VS_MALIGNANT]["all"]
    assert (bm["n"], bm["n_positive"], bm["auc"]) == (4, 2, 0.5)
    assert (bm["sensitivity"], bm["specificity"]) == (0.5, 0.5)  # b missed (nothing found); d's false region called
    # Malignant vs rest: 0.9 beats all four negatives; 0 loses to 0.3, 0.6, 0.7 and ties f's 0: 4.5 of 8 pairs.
    rest = report[MALIGNANT_VS_REST]["all"]
    assert (rest["n"], rest["n_positive"], rest["auc"]) == (6, 2, pytest.approx(4.5 / 8))
    assert rest["specificity"] == 0.5  # d and the normal e (0.7 reported) are false positives; c and f are not
    assert report[MALIGNANT_VS_REST]["operating_point_ci"]["specificity"]["value"] == 0.5
    # Per patient: p1 = max(0.9, 0) = 0.9 beats every other patient.
    patients = report["per_patient"][MALIGNANT_VS_REST]["all"]
    assert (patients["n"], patients["n_positive"], patients["auc"]) == (5, 1, 1.0)
    assert (patients["sensitivity"], patients["specificity"]) == (1.0, 0.5)
    assert report["per_patient"][BENIGN_VS_MALIGNANT]["all"]["n"] == 3
    nothing = report["nothing_found"]
    assert (nothing["all"]["nothing_found"], nothing["all"]["n"]) == (2, 6)
    assert nothing["lesion_images"]["fraction"] == 0.25 and nothing["malignant"]["nothing_found"] == 1
    assert (nothing["normal_images"]["nothing_found"], nothing["normal_images"]["n"]) == (1, 2)
    assert report["normal_images"] == {
        "n": 2,
        "with_a_lesion_reported": 1,
        "called_malignant": 1,
        "lesions_reported": 1,
    }
    assert report["images"] == {"n": 6, "lesion": 4, "malignant": 2, "normal": 2, "patients": 5}
    assert report["findings_per_image"] == pytest.approx(4 / 6)


def test_a_found_lesion_hits_the_lesion_it_overlaps_most_from_an_iou_of_0_1() -> None:
    assert hit_of((0.05, 0.2)) == 1
    assert hit_of((0.1,)) == 0  # the bound itself is a hit
    assert hit_of((0.09,)) is None
    assert hit_of(()) is None  # an image without a lesion: every region is a false positive
    assert hit_of((0.3,), min_iou=0.5) is None
    truth = np.zeros((20, 30), np.uint8)
    truth[0:10, 0:10] = 1  # 100 pixels
    (lesion,) = truth_lesions(truth)
    half = outline_mask(np.array([[5, 0], [14, 0], [14, 9], [5, 9], [5, 0]], np.float32), (20, 30))
    assert int(half.sum()) == 100  # the outline filled, edges included, as the SEG fills it
    assert overlaps_with(half, [lesion]) == pytest.approx((50 / 150,))  # 50 shared of 150: a hit
    edge = outline_mask(np.array([[9, 0], [18, 0], [18, 9], [9, 9], [9, 0]], np.float32), (20, 30))
    assert overlaps_with(edge, [lesion]) == pytest.approx((10 / 190,))  # 10 shared of 190: a false positive
    assert hit_of(overlaps_with(edge, [lesion])) is None


def test_ground_truth_lesions_are_the_mask_regions_largest_first() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[0:3, 0:3] = 1
    mask[10:18, 10:18] = 1
    regions = truth_lesions(mask)
    assert [int(r.sum()) for r in regions] == [64, 9]
    assert truth_lesions(np.zeros((5, 5), np.uint8)) == []


def test_the_froc_ranks_by_segmenter_confidence_and_counts_regions_on_normal_images_as_false_positives() -> None:
    images = [
        # a hit (0.9), a repeat hit on the same lesion (0.85: neither) and a miss (0.4: false positive)
        _image("a", "p1", 1, (0.1, 0.9, 0.5), (0.1, 0.85, 0.2), (0.9, 0.4, 0.0)),
        _image("b", "p2", 0, (0.9, 0.8, 0.05)),  # IoU 0.05: a false positive, the lesion missed
        _image("c", "p3", None, (0.2, 0.7, 0.0)),  # a region on a normal image
        _image("d", "p4", None),
    ]
    assert marked_image(images[0]).marks == ((0.9, 0), (0.85, 0), (0.4, None))
    curve = froc_of([marked_image(image) for image in images])
    assert (curve.lesions, curve.images) == (2, 4)
    assert curve.false_positives_per_image == (0.0, 0.0, 0.0, 0.25, 0.5, 0.75)
    assert curve.sensitivity == (0.0, 0.5, 0.5, 0.5, 0.5, 0.5)
    assert curve.sensitivity_at(0.5) == 0.5 and curve.end == 0.75
    report = served_report(images, THRESHOLD, resamples=20)
    froc = report["froc"]
    assert froc["sensitivity_at_fp_per_image"]["1"]["value"] == 0.5
    assert froc["curve_ends_at_fp_per_image"] == 0.75 and froc["sensitivity_at_curve_end"] == 0.5
    assert froc["sensitivity_at_curve_end_iou_0.5"] == 0.5  # a's hit has IoU 0.5 exactly
    assert froc["lesion_images_without_a_hit"] == 1  # b: a region reported, but not on its lesion


def test_the_served_section_leads_the_report_and_a_rerun_replaces_only_it() -> None:
    first = served_report(_six_images(), THRESHOLD, resamples=20, pipeline={"headline": "consensus"})
    second = served_report(_six_images()[:4], THRESHOLD, resamples=20, pipeline={"headline": "consensus"})
    report = {"data": "d", "split": "test", "families": {}, "comparisons": {}, "comparisons_with_readers": {}}
    merged = with_served(report, first)
    assert list(merged) == ["data", "split", "served", "families", "comparisons", "comparisons_with_readers"]
    assert list(with_served(merged, second)) == list(merged)  # replaced in place
    existing = "## Segmentation\n\nkept as it was\n\n\n## dl_u\n\nkept too\n"
    once = merged_markdown(existing, report, first)
    assert once.startswith("## As served: segmenter-found lesions")
    assert once == served_markdown(first) + "\n\n" + existing  # where a whole run puts it: first
    again = merged_markdown(once, merged, second)
    assert again == served_markdown(second) + "\n\n" + existing  # the earlier section replaced, the rest kept
    assert report_markdown_of(with_served(report, second)) == served_markdown(second) + "\n"
    without_image = {**report, "rows_without_image": {"count": 1, "first": ["x/lost"]}}
    notice = "**1 labelled row(s) had no image in `images/` and were not scored** (first: x/lost)."
    assert merged_markdown(f"{notice}\n\n{existing}", without_image, first) == (
        f"{notice}\n\n{served_markdown(first)}\n\n{existing}"
    )
