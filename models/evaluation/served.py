"""The B-mode pipeline judged as served: the figures of what the SR reports, on the held-out split (issue 36).

The family rows of ``breastai evaluate`` score each model on the ground-truth
lesion box, so they leave out every lesion the segmenter misses, outlines
badly or invents. Here every ultrasound image of the split goes through
:meth:`models.inference.pipeline.BModePipeline.analyse`, the call the worker
makes (:mod:`workers.consumer`), with the manifest's default US families: the
segmenter (and refiner) find the lesions, and each found lesion carries the
headline probability (the first malignancy family, the consensus by default)
that the SR reports. The analysed array is the image as the dataset stores
it, as for every other part of ``breastai evaluate``: the public sets hold the
scan area already (the worker first crops a DICOM frame to its scan region);
age and pixel spacing come from ``labels.csv`` where the dataset gives them.

Figures, each with a 95 % percentile-bootstrap interval over patients (all
images of a patient, or of a group of near-duplicate scans, drawn together):

- **per image**: the image score is the highest headline probability among
  the lesions found; an image where nothing was found scores 0 (its report
  says "no lesion"). Benign vs malignant AUC on the images that show a
  lesion; malignant vs the rest with the images without a lesion (BUSI and
  BrEaST normals) as negatives, so that whatever is reported on a normal image
  counts against it by its score; sensitivity and specificity at the headline
  family's operating point from the manifest (score >= it is called malignant,
  as the SR calls it);
- **per patient**: the highest image score of the patient's images (BUS-BRA's
  ``case``; elsewhere each image is its own patient, near-duplicate groups
  excepted); a patient is malignant when any of its images is;
- **lesion level**: a detection FROC over the ground-truth lesions (each
  connected region of the mask). A found lesion is its outline filled, as the
  SEG sends it; it hits the listed lesion it overlaps most when that IoU is at
  least :data:`HIT_IOU` (0.1: the question is whether the reader is pointed
  at the lesion, how well it is outlined is the segmentation report's Dice),
  else it is a false positive; a second hit on a lesion already found is
  neither. The found lesions are ranked by the segmenter's mean lesion
  probability inside them (its detection confidence; the malignancy score is
  not one), and the service reports every lesion found (at most three), so
  the curve's end is the served operating point. Also the fraction of images
  where the segmenter found nothing, and the stricter IoU >= 0.5 read at the
  curve's end;
- **the ground-truth box, same run**: the same headline scorer on the
  ground-truth box of each lesion image (as the family rows score it), and a
  paired DeLong test of the two readings on the same images.

``breastai evaluate`` runs it where the headline model is asked for (the
default). Run alone, merged into a report ``breastai evaluate`` already wrote
(the committed one here) without touching the rest of it (6 minutes on two
busy CPU cores for the 486 test images)::

    mkdir -p var/evaluation && cp models/cards/evaluation/report.* var/evaluation/
    breastai evaluate ../shared/datasets --served-only --output var/evaluation --cards models/cards
    cp var/evaluation/report.json var/evaluation/report.md var/evaluation/froc_us_served.png models/cards/evaluation/
    cp var/evaluation/report.md docs/evaluation.md
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from models.datasets import Record, mask_box, read_gray, read_mask
from models.errors import EvaluationError
from models.evaluation.finder import MarkedImage, estimate, froc_of, froc_sensitivities
from models.evaluation.report import (
    CasePrediction,
    classification_report,
    classification_table,
    compare_families,
    format_estimate,
)
from models.evaluation.stats import cluster_bootstrap_ci, iou, operating_point
from models.inference.manifest import ScorerSpec, Task
from models.inference.pipeline import (
    SEGMENTER_ROLE,
    BModePipeline,
    default_families_of,
    load_bmode_pipeline,
    with_consensus_members,
)
from models.inference.registry import ModelEntry, read_manifest_and_pipelines
from models.inference.scorers import ClinicalContext

#: A found lesion hits a ground-truth lesion when their IoU is at least this.
HIT_IOU = 0.1
#: The stricter overlap the report also reads at the FROC curve's end.
STRICT_IOU = 0.5
BENIGN_VS_MALIGNANT = "benign_vs_malignant"
MALIGNANT_VS_REST = "malignant_vs_rest"
TASKS = (BENIGN_VS_MALIGNANT, MALIGNANT_VS_REST)
STATISTICS_NOTE = (
    "95 % percentile-bootstrap intervals, {resamples} resamples over patients (all images of one patient, or of one "
    "group of near-duplicate scans, drawn together)"
)
SCORE_RULE = (
    "image score: the highest headline probability among the lesions the segmenter found, 0 where it found none "
    "(reported as no lesion)"
)
HIT_RULE = (
    "a found lesion (its outline filled, as the SEG sends it) hits the ground-truth lesion (a connected region of the "
    f"mask) it overlaps most when their IoU is >= {HIT_IOU:g}; found lesions ranked by the segmenter's mean lesion "
    "probability inside them"
)
PATIENT_RULE = "the highest image score of each patient's images; malignant when any of its images is"
TRUTH_BOX = "ground-truth box"
SERVED = "as served"


@dataclass(frozen=True)
class FoundLesion:
    """One lesion the served pipeline reported on an image.

    Attributes
    ----------
    probability
        The headline probability the SR reports for it.
    confidence
        The segmenter's mean lesion probability inside its outline: what the FROC ranks by.
    overlaps
        Its IoU with each ground-truth lesion of the image, in their order.
    """

    probability: float
    confidence: float
    overlaps: tuple[float, ...] = ()


@dataclass(frozen=True)
class ServedImage:
    """One analysed image: what it is, and what the served pipeline reported on it.

    Attributes
    ----------
    malignant
        1 malignant, 0 benign, None for an image without a lesion (a normal image).
    lesions
        Ground-truth lesions (connected regions of its mask).
    found
        The lesions the pipeline reported, as it ordered them.
    truth_box_probability
        The headline scorer's probability on the ground-truth box (largest mask region); None without a lesion.
    """

    image_id: str
    dataset: str
    device: str
    patient: str
    malignant: int | None
    lesions: int
    found: tuple[FoundLesion, ...]
    truth_box_probability: float | None = None

    @property
    def score(self) -> float:
        """The image score: the highest headline probability found, 0 where nothing was found."""
        return image_score(lesion.probability for lesion in self.found)


def image_score(probabilities: Iterable[float]) -> float:
    """The highest of ``probabilities``; 0 for none (an image where nothing was found reads "no lesion")."""
    return max(probabilities, default=0.0)


def hit_of(overlaps: Sequence[float], min_iou: float = HIT_IOU) -> int | None:
    """The ground-truth lesion a found lesion hits: the one it overlaps most, if that IoU is >= ``min_iou``."""
    if not overlaps:
        return None
    best = int(np.argmax(overlaps))
    return best if overlaps[best] >= min_iou else None


def truth_lesions(mask: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.bool_]]:
    """The ground-truth lesions of a mask: its connected regions (8-connected), largest first."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = sorted(range(1, count), key=lambda label: -int(stats[label, cv2.CC_STAT_AREA]))
    return [np.asarray(labels == label, dtype=bool) for label in order]


def outline_mask(outline_xy: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """A reported outline filled, as the worker fills it for the SEG (``workers.consumer``)."""
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(mask, [np.rint(outline_xy.astype(np.float64)).astype(np.int32)], 1)
    return mask.astype(bool)


def overlaps_with(found: npt.NDArray[np.bool_], truths: Sequence[npt.NDArray[np.bool_]]) -> tuple[float, ...]:
    """IoU of a found lesion's mask with each ground-truth lesion."""
    return tuple(iou(found, truth) for truth in truths)


def marked_image(image: ServedImage, min_iou: float = HIT_IOU) -> MarkedImage:
    """An image as the FROC reads it (:func:`models.evaluation.finder.froc_of`): confidence and hit of each lesion."""
    return MarkedImage(
        tuple((lesion.confidence, hit_of(lesion.overlaps, min_iou)) for lesion in image.found), image.lesions
    )


def image_predictions(images: Sequence[ServedImage], task: str) -> list[CasePrediction]:
    """One prediction per image for ``task``: the image score, clustered by patient.

    ``benign_vs_malignant`` takes the images that show a lesion; ``malignant_vs_rest`` every image, those without a
    lesion as negatives.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return [
        CasePrediction(
            image.image_id, image.dataset, image.device, int(image.malignant or 0), image.score, image.patient
        )
        for image in images
        if task == MALIGNANT_VS_REST or image.malignant is not None
    ]


def patient_predictions(predictions: Sequence[CasePrediction]) -> list[CasePrediction]:
    """One prediction per patient (cluster): the highest score of its images, malignant when any image is.

    Each patient is its own case (no cluster); it keeps its images' dataset and device where they share one,
    "mixed" otherwise. Sorted by patient.
    """
    patients: dict[str, list[CasePrediction]] = {}
    for case in predictions:
        patients.setdefault(case.cluster or f"case:{case.case_id}", []).append(case)
    pooled = []
    for patient, cases in sorted(patients.items()):
        datasets, devices = {c.dataset for c in cases}, {c.device for c in cases}
        pooled.append(
            CasePrediction(
                patient,
                datasets.pop() if len(datasets) == 1 else "mixed",
                devices.pop() if len(devices) == 1 else "mixed",
                max(c.label for c in cases),
                max(c.score for c in cases),
            )
        )
    return pooled


def _operating_point_intervals(
    cases: Sequence[CasePrediction], threshold: float, resamples: int
) -> dict[str, dict[str, Any]]:
    """Sensitivity and specificity at ``threshold`` with percentile-bootstrap intervals over the cases' clusters."""
    labels = np.array([c.label for c in cases], dtype=np.int64)
    scores = np.array([c.score for c in cases], dtype=np.float64)
    clusters = [c.cluster or f"case:{c.case_id}" for c in cases]
    point = operating_point(labels, scores, threshold)

    def sensitivity(index: npt.NDArray[np.int64]) -> float:
        return operating_point(labels[index], scores[index], threshold).sensitivity

    def specificity(index: npt.NDArray[np.int64]) -> float:
        return operating_point(labels[index], scores[index], threshold).specificity

    return {
        "sensitivity": estimate(point.sensitivity, cluster_bootstrap_ci(sensitivity, clusters, resamples)),
        "specificity": estimate(point.specificity, cluster_bootstrap_ci(specificity, clusters, resamples)),
    }


def _task_block(cases: Sequence[CasePrediction], threshold: float, resamples: int) -> dict[str, Any]:
    """:func:`~models.evaluation.report.classification_report` of ``cases`` with intervals on sensitivity and
    specificity; a note where there is no case.
    """
    if not cases:
        return {"note": "no image for this task in the data"}
    return {
        **classification_report(cases, threshold=threshold, resamples=resamples, pool_patients=False),
        "operating_point_ci": _operating_point_intervals(cases, threshold, resamples),
    }


def _nothing_found(images: Sequence[ServedImage]) -> dict[str, Any]:
    """How many images of each kind came back with no lesion reported."""

    def tally(group: Sequence[ServedImage]) -> dict[str, Any]:
        count = sum(1 for image in group if not image.found)
        return {"n": len(group), "nothing_found": count, "fraction": count / len(group) if group else None}

    return {
        "lesion_images": tally([i for i in images if i.malignant is not None]),
        "benign": tally([i for i in images if i.malignant == 0]),
        "malignant": tally([i for i in images if i.malignant == 1]),
        "normal_images": tally([i for i in images if i.malignant is None]),
        "all": tally(images),
    }


def _froc(images: Sequence[ServedImage], resamples: int) -> dict[str, Any]:
    marked = [marked_image(image) for image in images]
    curve = froc_of(marked)
    strict = froc_of([marked_image(image, STRICT_IOU) for image in images])
    return {
        "hit_rule": HIT_RULE,
        "images": curve.images,
        "lesions": curve.lesions,
        "sensitivity_at_fp_per_image": froc_sensitivities(marked, [image.patient for image in images], resamples),
        "curve_ends_at_fp_per_image": curve.end,
        "sensitivity_at_curve_end": curve.sensitivity[-1] if curve.lesions else None,
        # Images showing a lesion where no reported lesion hits one: their image score comes from somewhere else.
        "lesion_images_without_a_hit": sum(
            1 for image in images if image.lesions and all(hit_of(lesion.overlaps) is None for lesion in image.found)
        ),
        f"sensitivity_at_curve_end_iou_{STRICT_IOU:g}": strict.sensitivity[-1] if strict.lesions else None,
        "curve": {"fp_per_image": list(curve.false_positives_per_image), "sensitivity": list(curve.sensitivity)},
    }


def _truth_box_block(images: Sequence[ServedImage], resamples: int, threshold: float) -> dict[str, Any]:
    """The same headline scorer on the ground-truth boxes of the lesion images, and the paired test of both readings."""
    scored = [i for i in images if i.malignant is not None and i.truth_box_probability is not None]
    if not scored:
        return {"note": "no lesion image with a ground-truth box"}
    truth = [
        CasePrediction(
            i.image_id, i.dataset, i.device, int(i.malignant or 0), float(i.truth_box_probability or 0.0), i.patient
        )
        for i in scored
    ]
    boxed = {t.case_id for t in truth}
    served = [c for c in image_predictions(images, BENIGN_VS_MALIGNANT) if c.case_id in boxed]
    report = classification_report(truth, threshold=threshold, resamples=resamples, pool_patients=False)
    return {
        "all": report["all"],
        "operating_point_ci": _operating_point_intervals(truth, threshold, resamples),
        "comparison": compare_families({SERVED: served, TRUTH_BOX: truth}),
    }


def served_report(
    images: Sequence[ServedImage],
    threshold: float,
    resamples: int = 1000,
    pipeline: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The served figures of analysed ``images`` at the headline's operating point ``threshold`` (JSON-ready).

    ``pipeline`` (what ran: families, headline, models) is recorded as given.

    Raises
    ------
    EvaluationError
        ``images`` is empty.
    """
    if not images:
        raise EvaluationError("no image to judge the served pipeline on")
    by_task = {task: image_predictions(images, task) for task in TASKS}
    found = [len(image.found) for image in images]
    normals = [image for image in images if image.malignant is None]
    return {
        "pipeline": dict(pipeline or {}),
        "operating_point": float(threshold),
        "statistics": STATISTICS_NOTE.format(resamples=f"{resamples:,}"),
        "score_rule": SCORE_RULE,
        "images": {
            "n": len(images),
            "lesion": sum(1 for i in images if i.malignant is not None),
            "malignant": sum(1 for i in images if i.malignant == 1),
            "normal": len(normals),
            "patients": len({i.patient for i in images}),
        },
        "findings_per_image": float(np.mean(found)),
        "nothing_found": _nothing_found(images),
        "normal_images": {
            "n": len(normals),
            "with_a_lesion_reported": sum(1 for i in normals if i.found),
            "called_malignant": sum(1 for i in normals if i.score >= threshold),
            "lesions_reported": sum(len(i.found) for i in normals),
        },
        BENIGN_VS_MALIGNANT: _task_block(by_task[BENIGN_VS_MALIGNANT], threshold, resamples),
        MALIGNANT_VS_REST: _task_block(by_task[MALIGNANT_VS_REST], threshold, resamples),
        "per_patient": {
            "rule": PATIENT_RULE,
            **{task: _task_block(patient_predictions(by_task[task]), threshold, resamples) for task in TASKS},
        },
        "froc": _froc(images, resamples),
        "ground_truth_box": _truth_box_block(images, resamples, threshold),
    }


# ---------------------------------------------------------------- running the pipeline


def headline_role(model_dir: Path) -> str | None:
    """The role whose probability the served B-mode pipeline reports as its headline, or None without a segmenter.

    The first malignancy family of the manifest's default US list with the consensus members it brings (as
    :class:`~models.inference.pipeline.BModePipeline` picks it).
    """
    entries, pipelines = read_manifest_and_pipelines(model_dir)
    if SEGMENTER_ROLE not in entries:
        return None
    chosen = [r for r in default_families_of(pipelines, entries, "US") if r in entries]
    for role in with_consensus_members(chosen, entries):
        if entries[role].spec_as(ScorerSpec).task is Task.MALIGNANCY:
            return role
    return None


def _box_outline(box: tuple[int, int, int, int]) -> npt.NDArray[np.float32]:
    x, y, w, h = box
    return np.array([[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1], [x, y]], dtype=np.float32)


def analyse_record(pipeline: BModePipeline, record: Record, truth_box: bool = True) -> ServedImage:
    """One dataset image through the served pipeline, with what the judging needs (see the module docstring)."""
    gray = read_gray(record.image_path)
    shape = (int(gray.shape[0]), int(gray.shape[1]))
    context = ClinicalContext(age_years=record.age_years, pixel_spacing_mm=record.pixel_spacing_mm)
    analysis = pipeline.analyse(gray, context)
    probability = pipeline.lesion_probability(gray) if analysis.lesions else None
    truth_mask = read_mask(record, gray.shape)
    truths = truth_lesions(truth_mask)
    found = []
    for lesion in analysis.lesions:
        mask = outline_mask(lesion.outline_xy, shape)
        confidence = float(probability[mask].mean()) if probability is not None and mask.any() else 0.0
        found.append(FoundLesion(float(lesion.malignancy_probability), confidence, overlaps_with(mask, truths)))
    box_probability = None
    box = mask_box(truth_mask) if truth_box and record.malignant is not None else None
    if box is not None:
        scored = pipeline.score_lesion(gray, box, _box_outline(box), box[2] * box[3], context)
        box_probability = float(scored.malignancy_probability)
    return ServedImage(
        record.image_id,
        record.dataset,
        record.device,
        record.patient,
        record.malignant,
        len(truths),
        tuple(found),
        box_probability,
    )


def _pipeline_record(pipeline: BModePipeline, entries: Mapping[str, ModelEntry]) -> dict[str, Any]:
    headline = pipeline.families[0]
    entry = entries[headline]
    segmenter = pipeline.segmenter_info
    return {
        "families": list(pipeline.families),
        "headline": headline,
        "model": {"name": entry.name, "version": entry.version, "sha256": entry.sha256},
        "segmentation": {"name": segmenter.name, "version": segmenter.version},
        "analysed": "the image file as the dataset stores it (the scan area); age and pixel spacing from labels.csv",
    }


def evaluate_served(
    records: Sequence[Record], model_dir: Path, resamples: int = 1000, output: Path | None = None
) -> dict[str, Any]:
    """Run the served B-mode pipeline on every ultrasound record and judge what it reports (:func:`served_report`).

    With ``output``, also writes ``served_predictions.csv`` (one row per image) there.

    Raises
    ------
    EvaluationError
        No record to analyse.
    ModelRegistryError
        The default US pipeline cannot be loaded (a file fails its checksum, a consensus is stale).
    DatasetError
        An image or mask cannot be read.
    """
    if not records:
        raise EvaluationError("no ultrasound image to judge the served pipeline on")
    entries, _ = read_manifest_and_pipelines(model_dir)
    pipeline = load_bmode_pipeline(model_dir)
    threshold = entries[pipeline.families[0]].spec_as(ScorerSpec).operating_point
    images = [analyse_record(pipeline, record) for record in records]
    if output is not None:
        write_served_predictions(images, output / "served_predictions.csv")
    return served_report(images, threshold, resamples, _pipeline_record(pipeline, entries))


def write_served_predictions(images: Sequence[ServedImage], path: Path) -> Path:
    """One row per analysed image: its label, image score, lesions found and hit, and the ground-truth-box score."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "id",
                "dataset",
                "device",
                "patient",
                "label",
                "image_score",
                "found",
                "hits",
                "lesions",
                "ground_truth_box_probability",
            ]
        )
        for image in images:
            writer.writerow(
                [
                    image.image_id,
                    image.dataset,
                    image.device,
                    image.patient,
                    "normal" if image.malignant is None else image.malignant,
                    f"{image.score:.6f}",
                    len(image.found),
                    sum(1 for lesion in image.found if hit_of(lesion.overlaps) is not None),
                    image.lesions,
                    "" if image.truth_box_probability is None else f"{image.truth_box_probability:.6f}",
                ]
            )
    return path


# ---------------------------------------------------------------- report


def with_served(report: Mapping[str, Any], served: Mapping[str, Any]) -> dict[str, Any]:
    """``report`` with its ``served`` block set: first of the figures, right before ``families``."""
    merged: dict[str, Any] = {}
    for key, value in report.items():
        if key == "served":
            continue
        if key == "families":
            merged["served"] = served
        merged[key] = value
    merged.setdefault("served", served)
    return merged


def save_served_figures(served: Mapping[str, Any], output: Path) -> list[Path]:
    """The served FROC as ``froc_us_served.png`` in ``output``."""
    from models.evaluation.plots import save_froc_png

    froc = served["froc"]
    if not froc["lesions"]:
        return []
    marks = {
        float(rate): value["value"]
        for rate, value in froc["sensitivity_at_fp_per_image"].items()
        if value["value"] is not None
    }
    return [
        save_froc_png(
            output / "froc_us_served.png",
            froc["curve"]["fp_per_image"],
            froc["curve"]["sensitivity"],
            marks,
            title=f"FROC, B-mode segmenter as served\n({froc['images']} images, {froc['lesions']} lesions)",
            label="segmenter + refiner",
            ylabel="Sensitivity (ground-truth lesions found)",
        )
    ]


def _ci(block: Mapping[str, Any] | None) -> str:
    """``0.876 (0.836–0.912)`` from a classification group or an ``{"value", "ci95"}`` estimate."""
    if not block:
        return "n/a"
    if "ci95" in block:
        low, high = block["ci95"]
        return format_estimate(block["value"], None if low is None else [low, high])
    return format_estimate(block.get("auc"), block.get("auc_ci"))


def _counted(count: int, total: int) -> str:
    return f"{count} of {total}" + (f" ({100 * count / total:.1f} %)" if total else "")


def _task_rows(label: str, block: Mapping[str, Any], n_text: str) -> list[str]:
    if "all" not in block:
        return [f"| {label} | {block.get('note', 'n/a')} | – |"]
    interval = block["operating_point_ci"]
    return [
        f"| {label}: AUC | {_ci(block['all'])} | {n_text} |",
        f"| {label}: sensitivity / specificity at the operating point | {_ci(interval['sensitivity'])} / "
        f"{_ci(interval['specificity'])} | |",
    ]


def _n_images(block: Mapping[str, Any], unit: str, rest: str = "") -> str:
    if "all" not in block:
        return "–"
    group = block["all"]
    return f"{group['n']} {unit} ({group['n_positive']} malignant{rest})"


def served_markdown(served: Mapping[str, Any]) -> str:
    """The served figures as a Markdown section of report.md: the summary table, then the per-image tables per
    dataset and scanner.
    """
    pipeline = served["pipeline"]
    headline = pipeline.get("headline", "headline")
    model = pipeline.get("model", {})
    images, nothing, normals, froc = served["images"], served["nothing_found"], served["normal_images"], served["froc"]
    patients = served["per_patient"]
    families = ", ".join(f"`{family}`" for family in pipeline.get("families", []))
    segmentation = pipeline.get("segmentation", {})
    lines = [
        f"## As served: segmenter-found lesions, the headline score (`{headline}` {model.get('version', '')})",
        "",
        f"What the SR reports: every image through the served B-mode pipeline ({families}; "
        f"{segmentation.get('name', '')} {segmentation.get('version', '')}); {served['score_rule']}; called malignant "
        "at score ≥ "
        f"{served['operating_point']:.3f} (the manifest's operating point). {served['statistics']}.",
        "",
        "| figure | value (95 % CI) | n |",
        "|---|---|---|",
        *_task_rows(
            "Benign vs malignant, lesion images, image score",
            served[BENIGN_VS_MALIGNANT],
            _n_images(served[BENIGN_VS_MALIGNANT], "images"),
        ),
        *_task_rows(
            "Malignant vs rest, normal images included",
            served[MALIGNANT_VS_REST],
            _n_images(served[MALIGNANT_VS_REST], "images", f", {images['normal']} normal"),
        ),
        *_task_rows(
            "Per patient (highest image score), benign vs malignant",
            patients[BENIGN_VS_MALIGNANT],
            _n_images(patients[BENIGN_VS_MALIGNANT], "patients"),
        ),
        *_task_rows(
            "Per patient (highest image score), malignant vs rest",
            patients[MALIGNANT_VS_REST],
            _n_images(patients[MALIGNANT_VS_REST], "patients"),
        ),
    ]
    # Per dataset only where a patient has several images (BUS-BRA's two views of one tumour): elsewhere the same.
    per_image = served[BENIGN_VS_MALIGNANT].get("by_dataset", {})
    for name, group in patients[BENIGN_VS_MALIGNANT].get("by_dataset", {}).items():
        if name in per_image and group["n"] < per_image[name]["n"]:
            lines.append(
                f"| Per patient, {name}, benign vs malignant: AUC | {_ci(group)} | {group['n']} patients "
                f"({group['n_positive']} malignant) of {per_image[name]['n']} images |"
            )
    for rate, value in froc["sensitivity_at_fp_per_image"].items():
        lines.append(
            f"| Detection: FROC sensitivity at {rate} false positive(s) per image | {_ci(value)} | "
            f"{froc['lesions']} lesions on {froc['images']} images |"
        )
    lines += [
        f"| Images where the segmenter found nothing | {_counted(nothing['all']['nothing_found'], nothing['all']['n'])}"
        f" | lesion images {_counted(nothing['lesion_images']['nothing_found'], nothing['lesion_images']['n'])}; "
        f"malignant {nothing['malignant']['nothing_found']} of {nothing['malignant']['n']}; normal "
        f"{nothing['normal_images']['nothing_found']} of {nothing['normal_images']['n']} |",
        f"| Normal images with a lesion reported (false positives) | "
        f"{_counted(normals['with_a_lesion_reported'], normals['n'])}; {normals['called_malignant']} called malignant "
        f"| {normals['n']} normal images, {normals['lesions_reported']} lesions reported on them |",
    ]
    truth = served.get("ground_truth_box", {})
    if "all" in truth:
        interval = truth["operating_point_ci"]
        lines.append(
            f"| Ground-truth box (second row: no segmentation misses), benign vs malignant: AUC; sensitivity / "
            f"specificity | {_ci(truth['all'])}; {_ci(interval['sensitivity'])} / {_ci(interval['specificity'])} | "
            f"{truth['all']['n']} images ({truth['all']['n_positive']} malignant), scored in the same run |"
        )
        (comparison,) = truth["comparison"]
        if comparison["difference"] is not None:
            lines.append(
                f"| AUC as served minus on the ground-truth box (paired DeLong, clustered) | "
                f"{format_estimate(comparison['difference'], comparison['difference_ci'])}, "
                f"{_p(comparison['p_value'])} | {comparison['n_common']} images |"
            )
    lines += [
        "",
        f"- Detection hit rule: {froc['hit_rule']}. The curve ends at {froc['curve_ends_at_fp_per_image']:.2f} false "
        f"positives per image with sensitivity {_number(froc['sensitivity_at_curve_end'])} (every reported lesion "
        f"counted: the served operating point; a rate beyond the end reads the end's sensitivity); at IoU ≥ "
        f"{STRICT_IOU:g}, {_number(froc[f'sensitivity_at_curve_end_iou_{STRICT_IOU:g}'])}. "
        f"{served['findings_per_image']:.2f} lesions reported per image on average; on "
        f"{froc['lesion_images_without_a_hit']} of {nothing['lesion_images']['n']} lesion images no reported lesion "
        "hits the lesion, so their image score comes from another region.",
        "- The family rows below score each family on the ground-truth lesion box (largest mask region): they leave "
        "out the segmenter's misses and inventions, these do not.",
    ]
    for task, title in (
        (BENIGN_VS_MALIGNANT, "As served, benign vs malignant (lesion images, image score)"),
        (MALIGNANT_VS_REST, "As served, malignant vs rest (normal images as negatives)"),
    ):
        if "all" in served[task]:
            lines += ["", f"### {title}", "", classification_table(served[task])]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _p(value: float | None) -> str:
    if value is None:
        return "p n/a"
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"
