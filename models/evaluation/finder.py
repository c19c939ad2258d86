"""Judging the mammography lesion finder on mini-MIAS, as served (ONNX Runtime, no torch).

Usage::

    python -m models.evaluation.finder ../shared/datasets --output var/evaluation/mg_finder --card models/cards

``breastai evaluate`` runs the same evaluation where the model folder has a
finder and the data hold mini-MIAS (:mod:`models.evaluation.command`).

Every image of the split goes through :meth:`MammogramFinder.find` exactly as
serving calls it: the pixel size mini-MIAS states (0.4 mm), and no chest-wall
side, so the tissue heuristic decides. Three figures, each with a 95 %
percentile-bootstrap interval over women (both views of a woman drawn
together; :func:`models.evaluation.stats.bootstrap_ci` and
:func:`~models.evaluation.stats.cluster_bootstrap_ci`):

- **image level**: abnormal (any listed abnormality) against normal images,
  the image's score being its most probable finding's probability (0 without
  one), as AUC;
- **FROC**: the sensitivity over listed abnormalities at 0.5, 1 and 2 false
  positives per image. A finding is a hit when its centre lies inside a
  listed circle; a finding that hits nothing is a false positive; a second
  finding on an abnormality already found is neither. Images with an
  abnormality listed without a centre cannot be judged region by region and
  are left out of the FROC (not of the image-level AUC). Where the finder's
  findings run out before a rate is reached, the curve is flat from its end
  on, and the report says where it ends;
- **DL-M on what the finder found**: the ``dl_m`` family, loaded with
  :func:`models.inference.pipeline.load_scorer` as serving loads it, scores
  the box of the most probable finding that hit each listed benign or
  malignant abnormality; its AUC for malignancy, beside its AUC on the same
  abnormalities' ground-truth boxes (the square around the listed circle, as
  ``breastai evaluate`` scores DL-M).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from models.datasets import MIAS_MM_PER_PIXEL, MiasCase, mias_cases, read_gray
from models.errors import DatasetError, EvaluationError
from models.evaluation.stats import auc, bootstrap_ci, cluster_bootstrap_ci
from models.inference.mammography import MammogramFinder, MammogramFinding, finder_of, image_score
from models.inference.manifest import MG_FINDER_ROLE, MammogramFinderSpec
from models.inference.pipeline import load_scorer
from models.inference.registry import BUNDLED_MODEL_DIR, ModelEntry, read_manifest
from models.inference.scorers import LesionView

#: The false-positive rates (per image) the FROC is read at.
FP_RATES = (0.5, 1.0, 2.0)
#: The mammography family that scores each found region (Xu et al.'s DL-M branch).
DL_M_ROLE = "dl_m"
#: Side of the square around a listed circle as ``breastai evaluate`` cuts DL-M's ground-truth box: at least 8 px.
MIN_TRUTH_HALF_SIDE_PX = 8
STATISTICS_NOTE = (
    "95 % percentile-bootstrap intervals, {resamples} resamples over women (both views of a woman drawn together); "
    "FROC hit: a finding's centre inside a listed circle"
)
UNDEFINED = "undefined: needs both classes"


@dataclass(frozen=True)
class FoundImage:
    """One image's listed abnormalities and what the finder reported on it."""

    case: MiasCase
    findings: tuple[MammogramFinding, ...]

    @property
    def score(self) -> float:
        """The image-level score: the most probable finding's probability, 0 without one."""
        return image_score(self.findings)


def hit_of(finding: MammogramFinding, case: MiasCase) -> int | None:
    """Index of the listed abnormality whose circle holds the finding's centre (the nearest, relative to its radius,
    where circles overlap), or None: a false positive.
    """
    x, y = finding.centre_xy
    best, best_distance = None, math.inf
    for index, listed in enumerate(case.findings):
        relative = math.hypot(x - listed.centre_xy[0], y - listed.centre_xy[1]) / max(listed.radius_px, 1e-6)
        if relative <= 1.0 and relative < best_distance:
            best, best_distance = index, relative
    return best


@dataclass(frozen=True)
class FrocCurve:
    """A FROC curve: one point per distinct finding probability, in order of decreasing threshold.

    Attributes
    ----------
    false_positives_per_image, sensitivity
        The points, starting at (0, 0).
    lesions
        Listed abnormalities the sensitivity is a fraction of.
    images
        Images the false positives are averaged over.
    """

    false_positives_per_image: tuple[float, ...]
    sensitivity: tuple[float, ...]
    lesions: int
    images: int

    def sensitivity_at(self, rate: float) -> float:
        """The highest sensitivity with at most ``rate`` false positives per image (NaN without lesions)."""
        if not self.lesions:
            return float("nan")
        reached = [s for f, s in zip(self.false_positives_per_image, self.sensitivity, strict=True) if f <= rate]
        return max(reached, default=0.0)

    @property
    def end(self) -> float:
        """False positives per image with every reported finding counted: the curve is flat beyond it."""
        return self.false_positives_per_image[-1]


def judged(images: Sequence[FoundImage]) -> list[FoundImage]:
    """The images a FROC can judge: every listed abnormality of the image has a centre."""
    return [image for image in images if image.case.unlocated == 0]


@dataclass(frozen=True)
class MarkedImage:
    """One image as a FROC reads it, whatever found the regions: each reported region's score and the index of the
    listed lesion it hits (None: a false positive), and how many lesions the image lists.
    """

    marks: tuple[tuple[float, int | None], ...]
    lesions: int


def froc_of(images: Sequence[MarkedImage]) -> FrocCurve:
    """The FROC curve of ``images`` (an image listed twice counts twice, as a bootstrap draws it).

    Regions are taken in order of decreasing score, all regions of one score
    together, so that ties do not order the curve. A region hitting a lesion
    already found is neither a hit nor a false positive.
    """
    events: list[tuple[float, int, int | None]] = []
    for position, image in enumerate(images):
        events += [(score, position, hit) for score, hit in image.marks]
    events.sort(key=lambda event: -event[0])
    lesions = sum(image.lesions for image in images)
    count = max(1, len(images))
    found: set[tuple[int, int]] = set()
    false_positives = 0
    rates, sensitivities = [0.0], [0.0]
    for index, (probability, position, hit) in enumerate(events):
        if hit is None:
            false_positives += 1
        else:
            found.add((position, hit))
        if index + 1 < len(events) and events[index + 1][0] == probability:
            continue  # the next finding has the same probability: one threshold takes both
        rates.append(false_positives / count)
        sensitivities.append(len(found) / lesions if lesions else 0.0)
    return FrocCurve(tuple(rates), tuple(sensitivities), lesions, len(images))


def marked(image: FoundImage) -> MarkedImage:
    """A mini-MIAS image as the FROC reads it: each finding's probability and the listed circle it hits."""
    return MarkedImage(tuple((f.probability, hit_of(f, image.case)) for f in image.findings), len(image.case.findings))


def froc_curve(images: Sequence[FoundImage]) -> FrocCurve:
    """The FROC curve of mini-MIAS ``images`` (all judged): :func:`froc_of` with :func:`hit_of` as the hit rule."""
    return froc_of([marked(image) for image in images])


def froc_sensitivities(
    images: Sequence[MarkedImage], clusters: Sequence[str], resamples: int, rates: Sequence[float] = FP_RATES
) -> dict[str, Any]:
    """The FROC sensitivity at each of ``rates`` with its percentile-bootstrap interval over ``clusters``.

    One cluster key per image (the patient); whole clusters are drawn together
    (:func:`~models.evaluation.stats.cluster_bootstrap_ci`). Keyed by the rate as
    ``f"{rate:g}"``, each ``{"value", "ci95"}`` (None where undefined).
    """
    curve = froc_of(images)
    at: dict[str, Any] = {}
    for rate in rates:

        def resampled(index: npt.NDArray[np.int64], rate: float = rate) -> float:
            return froc_of([images[i] for i in index]).sensitivity_at(rate)

        at[f"{rate:g}"] = estimate(curve.sensitivity_at(rate), cluster_bootstrap_ci(resampled, clusters, resamples))
    return at


def froc_score(images: Sequence[FoundImage]) -> float:
    """The mean sensitivity at :data:`FP_RATES`: one number for choosing a checkpoint on validation images."""
    curve = froc_curve(judged(images))
    return float(np.mean([curve.sensitivity_at(rate) for rate in FP_RATES]))


def image_auc(images: Sequence[FoundImage]) -> float:
    """Abnormal-vs-normal AUC of the image scores; NaN where the images hold one class only."""
    labels = [int(image.case.abnormal) for image in images]
    if len(set(labels)) < 2:
        return float("nan")
    return auc(labels, [image.score for image in images])


def find_all(finder: MammogramFinder, cases: Sequence[MiasCase]) -> list[FoundImage]:
    """Run the finder on every case as serving does: the stated pixel size, the chest-wall side left to it."""
    return [FoundImage(case, finder.find(read_gray(case.image_path), MIAS_MM_PER_PIXEL, None)) for case in cases]


def estimate(value: float, interval: tuple[float, float]) -> dict[str, Any]:
    """An estimate with its interval as the reports write it: ``{"value", "ci95": [low, high]}``, NaN as None."""

    def number(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"value": number(value), "ci95": [number(interval[0]), number(interval[1])]}


def _image_level(images: Sequence[FoundImage], resamples: int) -> dict[str, Any]:
    labels = [int(image.case.abnormal) for image in images]
    scores = [image.score for image in images]
    women = [image.case.patient for image in images]
    block: dict[str, Any] = {
        "n": len(images),
        "n_abnormal": int(sum(labels)),
        "images_with_a_finding": {
            "abnormal": sum(1 for i in images if i.findings and i.case.abnormal),
            "normal": sum(1 for i in images if i.findings and not i.case.abnormal),
        },
    }
    if len(set(labels)) < 2:
        return {**block, "auc": None, "note": UNDEFINED}
    return {**block, "auc": estimate(auc(labels, scores), bootstrap_ci(labels, scores, resamples, clusters=women))}


def _froc(images: Sequence[FoundImage], resamples: int) -> dict[str, Any]:
    froc_images = judged(images)
    curve = froc_curve(froc_images)
    women = [image.case.patient for image in froc_images]
    at = froc_sensitivities([marked(image) for image in froc_images], women, resamples)
    by_type: dict[str, dict[str, int]] = {}
    for image in froc_images:
        hits = {hit_of(f, image.case) for f in image.findings}
        for index, listed in enumerate(image.case.findings):
            tally = by_type.setdefault(listed.abnormality, {"listed": 0, "found": 0})
            tally["listed"] += 1
            tally["found"] += int(index in hits)
    return {
        "images": curve.images,
        "lesions": curve.lesions,
        "left_out_images_with_unlocated_abnormality": len(images) - len(froc_images),
        "sensitivity_at_fp_per_image": at,
        "curve_ends_at_fp_per_image": curve.end,
        "sensitivity_at_curve_end": curve.sensitivity[-1],
        "found_by_type_at_curve_end": dict(sorted(by_type.items())),
        "curve": {"fp_per_image": list(curve.false_positives_per_image), "sensitivity": list(curve.sensitivity)},
    }


def _truth_box(case: MiasCase, index: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h): the square around a listed circle, at least 16 px, clipped (as mini-MIAS boxes are cut)."""
    listed = case.findings[index]
    half = max(MIN_TRUTH_HALF_SIDE_PX, round(listed.radius_px))
    cx, cy = int(listed.centre_xy[0]), int(listed.centre_xy[1])
    rows, columns = shape
    x0, y0, x1, y1 = max(0, cx - half), max(0, cy - half), min(columns, cx + half), min(rows, cy + half)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def _dl_m_on_found(
    images: Sequence[FoundImage], entries: Mapping[str, ModelEntry], model_dir: Path, resamples: int
) -> dict[str, Any]:
    """DL-M's malignancy AUC on the listed benign or malignant abnormalities the finder hit.

    Scored twice: on the box of the most probable finding that hit each, and on its ground-truth box.
    """
    if DL_M_ROLE not in entries:
        return {"note": f"the model folder has no {DL_M_ROLE}"}
    scorer = load_scorer(entries[DL_M_ROLE], entries, model_dir)
    labels: list[int] = []
    on_found: list[float] = []
    on_truth: list[float] = []
    women: list[str] = []
    listed_count = 0
    for image in judged(images):
        gray = read_gray(image.case.image_path)
        shape = (int(gray.shape[0]), int(gray.shape[1]))
        for index, listed in enumerate(image.case.findings):
            if listed.severity not in ("B", "M"):
                continue
            listed_count += 1
            hitting = [f for f in image.findings if hit_of(f, image.case) == index]
            if not hitting:
                continue
            best = max(hitting, key=lambda f: f.probability)
            x0, y0, x1, y1 = best.box_xyxy
            mask = np.zeros(shape, dtype=np.uint8)
            cv2.fillPoly(mask, [np.rint(best.outline_xy).astype(np.int32)], 1)
            found = LesionView(gray, (x0, y0, max(1, x1 - x0), max(1, y1 - y0)), mask.astype(bool))
            labels.append(int(listed.severity == "M"))
            on_found.append(scorer.score_lesion(found, {}).probability)
            on_truth.append(scorer.score_lesion(LesionView(gray, _truth_box(image.case, index, shape)), {}).probability)
            women.append(image.case.patient)
    block: dict[str, Any] = {
        "model": {"name": entries[DL_M_ROLE].name, "version": entries[DL_M_ROLE].version},
        "listed_benign_or_malignant": listed_count,
        "n": len(labels),
        "n_malignant": int(sum(labels)),
    }
    if len(set(labels)) < 2:
        return {**block, "auc_on_found_boxes": None, "auc_on_truth_boxes": None, "note": UNDEFINED}
    return {
        **block,
        "auc_on_found_boxes": estimate(
            auc(labels, on_found), bootstrap_ci(labels, on_found, resamples, clusters=women)
        ),
        "auc_on_truth_boxes": estimate(
            auc(labels, on_truth), bootstrap_ci(labels, on_truth, resamples, clusters=women)
        ),
    }


def evaluate_finder(
    data: Path, model_dir: Path | None = None, split: str = "test", resamples: int = 1000, role: str = MG_FINDER_ROLE
) -> dict[str, Any]:
    """The finder's figures on one split of the mini-MIAS folder under ``data`` (or ``data`` itself), as served.

    Parameters
    ----------
    data
        A folder holding ``mias/`` (laid out like ``shared/datasets``), or the ``mias`` folder itself.
    model_dir
        The model folder (the bundled models when None).
    split
        ``test`` (the held-out split), ``val``, ``train`` or ``all``.
    resamples
        Bootstrap resamples for every interval.
    role
        The finder's manifest role.

    Returns
    -------
    dict
        JSON-ready: the model, the data, ``image_level``, ``froc`` and ``dl_m_on_found``.

    Raises
    ------
    EvaluationError
        The data hold no mini-MIAS image of ``split``, or the folder has no finder.
    ModelRegistryError
        The finder's (or DL-M's) entry is incomplete or its file fails its checksum.
    """
    directory = model_dir or BUNDLED_MODEL_DIR
    entries = read_manifest(directory)
    if role not in entries:
        raise EvaluationError(f"{directory / 'manifest.json'} lists no {role}")
    root = data.parent if data.name == "mias" else data
    try:
        cases = [c for c in mias_cases(root) if split == "all" or c.split == split]
    except DatasetError as exc:
        raise EvaluationError(f"cannot read mini-MIAS under {data}: {exc}") from exc
    if not cases:
        raise EvaluationError(f"no mini-MIAS image of the {split} split under {data}")
    entry = entries[role]
    finder = finder_of(entry, directory)
    images = find_all(finder, cases)
    spec = entry.spec_as(MammogramFinderSpec)
    return {
        "model": {"name": entry.name, "version": entry.version, "sha256": entry.sha256, "file": entry.file},
        "data": str(data),
        "split": split,
        "statistics": STATISTICS_NOTE.format(resamples=f"{resamples:,}"),
        "served_as": {
            "mm_per_pixel": spec.mm_per_pixel,
            "threshold": spec.threshold,
            "min_area_mm2": spec.min_area_mm2,
            "max_findings": spec.max_findings,
            "pixel_spacing_given_mm": MIAS_MM_PER_PIXEL,
            "chest_wall_side": "decided by chest_wall_on_left (no DICOM orientation)",
        },
        "findings_per_image": float(np.mean([len(image.findings) for image in images])),
        "image_level": _image_level(images, resamples),
        "froc": _froc(images, resamples),
        "dl_m_on_found": _dl_m_on_found(images, entries, directory, resamples),
    }


def save_finder_figures(report: Mapping[str, Any], output: Path, role: str = MG_FINDER_ROLE) -> list[Path]:
    """Write the FROC PNG of a finder report into ``output``: ``froc_<role>.png``."""
    from models.evaluation.plots import save_froc_png

    froc = report["froc"]
    marks = {
        float(rate): estimate["value"]
        for rate, estimate in froc["sensitivity_at_fp_per_image"].items()
        if estimate["value"] is not None
    }
    path = save_froc_png(
        output / f"froc_{role}.png",
        froc["curve"]["fp_per_image"],
        froc["curve"]["sensitivity"],
        marks,
        title=f"FROC, {role}\n({report['split']} split: {froc['images']} images, {froc['lesions']} abnormalities)",
    )
    return [path]


def _format(estimate: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not estimate or estimate.get("value") is None:
        return "not computable"
    low, high = estimate["ci95"]
    interval = "" if low is None else f" (95 % CI {low:.{digits}f}–{high:.{digits}f})"
    return f"{estimate['value']:.{digits}f}{interval}"


def finder_markdown(report: Mapping[str, Any], title: str = MG_FINDER_ROLE) -> str:
    """The report's figures as a Markdown section (for report.md and the card)."""
    level, froc, dl_m = report["image_level"], report["froc"], report["dl_m_on_found"]
    lines = [
        f"## {title}",
        "",
        f"Split `{report['split']}` of `{report['data']}`; {report['statistics']}.",
        "",
        "| figure | value | n |",
        "|---|---|---|",
        f"| image-level AUC, abnormal vs normal (score: most probable finding, 0 without one) | "
        f"{_format(level.get('auc'))} | {level['n']} images ({level['n_abnormal']} abnormal) |",
    ]
    for rate, estimate in froc["sensitivity_at_fp_per_image"].items():
        lines.append(
            f"| FROC sensitivity at {rate} false positive(s) per image | {_format(estimate)} | "
            f"{froc['lesions']} abnormalities on {froc['images']} images |"
        )
    if "auc_on_found_boxes" in dl_m:
        n_text = f"{dl_m['n']} found of {dl_m['listed_benign_or_malignant']} listed ({dl_m['n_malignant']} malignant)"
        lines += [
            f"| DL-M malignancy AUC on the finder's boxes of the abnormalities it found | "
            f"{_format(dl_m['auc_on_found_boxes'])} | {n_text} |",
            f"| DL-M malignancy AUC on the ground-truth boxes of the same abnormalities | "
            f"{_format(dl_m['auc_on_truth_boxes'])} | {n_text} |",
        ]
    else:
        lines.append(f"| DL-M on found abnormalities | {dl_m.get('note', 'not run')} | – |")
    found = ", ".join(f"{kind} {t['found']}/{t['listed']}" for kind, t in froc["found_by_type_at_curve_end"].items())
    with_finding = level["images_with_a_finding"]
    lines += [
        "",
        f"- The FROC curve ends at {froc['curve_ends_at_fp_per_image']:.2f} false positives per image "
        f"(every reported finding counted), with sensitivity {froc['sensitivity_at_curve_end']:.3f}; a rate beyond "
        "its end reads the end's sensitivity.",
        f"- Found by type at the curve's end: {found}.",
        f"- Images with at least one finding: {with_finding['abnormal']} of {level['n_abnormal']} abnormal, "
        f"{with_finding['normal']} of {level['n'] - level['n_abnormal']} normal; "
        f"{report['findings_per_image']:.2f} findings per image on average.",
    ]
    if froc["left_out_images_with_unlocated_abnormality"]:
        lines.append(
            f"- {froc['left_out_images_with_unlocated_abnormality']} image(s) with an abnormality listed without a "
            "centre are left out of the FROC (kept in the image-level AUC)."
        )
    return "\n".join(lines)


def verdict(report: Mapping[str, Any]) -> str:
    """One plain paragraph on how good the finder is, from its figures (for the card)."""
    level, froc = report["image_level"], report["froc"]
    image_auc_estimate = level.get("auc") or {}
    low, high = image_auc_estimate.get("ci95", [None, None])
    at_one = froc["sensitivity_at_fp_per_image"].get("1", {}).get("value")
    parts = []
    if low is not None and low <= 0.5 <= high:
        parts.append(
            f"its image-level AUC ({image_auc_estimate['value']:.3f}) does not differ from chance: the interval "
            "includes 0.5, so its highest probability does not tell abnormal images from normal ones"
        )
    elif image_auc_estimate.get("value") is not None:
        parts.append(f"its image-level AUC is {image_auc_estimate['value']:.3f} ({low:.3f}–{high:.3f})")
    if at_one is not None:
        parts.append(
            f"at one false positive per image it finds {round(at_one * froc['lesions'])} of the {froc['lesions']} "
            "listed abnormalities"
        )
    calcifications = froc["found_by_type_at_curve_end"].get("CALC")
    if calcifications:
        parts.append(
            f"{calcifications['found']} of {calcifications['listed']} calcification clusters are found even with "
            "every reported region counted"
        )
    strength = "**Weak.** " if at_one is not None and at_one < 0.5 else ""
    return (
        f"{strength}On the held-out split " + "; ".join(parts) + ". With so few test images every interval is wide; "
        "the figures show that the finder runs end to end on real mammograms, not that it finds cancer."
    )


def finder_card(entry: ModelEntry, report: Mapping[str, Any], text: Mapping[str, str]) -> str:
    """The finder's model card: what it is, how it was made, the held-out figures, its limits.

    ``text`` is the card prose of :mod:`models.families.mg_finder.card` (architecture, deviations, limits).
    """
    spec = entry.spec_as(MammogramFinderSpec)
    training = spec.provenance.get("training", {})
    split = training.get("cases", {})
    split_rows = "\n".join(
        f"| {name} | {counts.get('images', 0)} | {counts.get('abnormal', 0)} | {counts.get('listed', 0)} |"
        for name, counts in ((name, split[name]) for name in ("train", "val", "test") if name in split)
    )
    return "\n".join(
        [
            f"# Model card: {entry.name} {entry.version}",
            "",
            f"- **Role:** `{entry.role}` (the mammography lesion finder)",
            f"- **File:** `{entry.file}` ({spec.precision.value if spec.precision else 'float32'}), "
            f"sha256 `{entry.sha256}`",
            "",
            "## Intended use",
            "",
            "Advisory decision support: it proposes regions of a full-field mammogram a radiologist may want to "
            "look at again (masses, architectural distortion, asymmetry, calcification clusters), each with the "
            "finder's probability that the region is an abnormality. The output is an AI estimate, **not a "
            "diagnosis**; it must not be used to rule anything in or out without a radiologist's reading, and it "
            "does not replace screening by a person. Not a medical device; not cleared or approved by any "
            "regulator.",
            "",
            "**Trained and tested only on mini-MIAS**: 322 digitised screen-film MLO mammograms from the 1990s, here "
            "512 x 512 pixels of 400 um (258 of them in `shared/datasets`). It has **not been validated on "
            "full-field digital mammography** (FFDM) or tomosynthesis, whose contrast, noise and processing differ "
            "from digitised film: on a DICOM mammogram its output is a demonstration, advisory only.",
            "",
            "## Model",
            "",
            text.get("architecture", ""),
            "",
            f"Serving (`models/inference/mammography.py`): the image is resampled to {spec.mm_per_pixel} mm per "
            f"pixel, mirrored so that the chest wall is on the left (DICOM Patient Orientation where the header has "
            f"it, else a tissue-mass heuristic), standardised over its tissue, padded to a multiple of "
            f"{spec.side_multiple} px; the heat map is thresholded at {spec.threshold}, regions smaller than "
            f"{spec.min_area_mm2} mm² are dropped, each region's probability is the heat map's peak inside it, and "
            f"at most {spec.max_findings} regions are reported, mapped back to the input's pixels.",
            "",
            "**Deviations and choices:** " + text.get("deviations", ""),
            "",
            "## Data and split",
            "",
            "mini-MIAS (`shared/datasets/mias`), split by woman (both views of a woman in one split; "
            "`models/datasets.py`): 20 % test (held out: used for the figures below only), 10 % validation (the "
            "checkpoint was chosen there), the rest training.",
            "",
            "| split | images | abnormal images | listed abnormalities with a centre |",
            "|---|---:|---:|---:|",
            split_rows,
            "",
            f"Training: {training.get('epochs_run')} of {training.get('epochs')} epochs ran, batch "
            f"{training.get('batch_size')}, learning rate {training.get('learning_rate')}, seed "
            f"{training.get('seed')}, {training.get('autocast') or 'fp32'} autocast, "
            f"{training.get('crop_px')} px crops; best validation epoch {training.get('best_epoch')} (counting from 0) "
            f"(validation FROC score, the mean sensitivity at 0.5, 1 and 2 false positives per image, "
            f"{training.get('val_froc_score')} as the run measured it, {training.get('val_froc_score_as_served')} "
            f"through the exported file; validation image-level AUC {training.get('val_image_auc_as_served')} "
            f"through the file); {training.get('minutes')} minutes of training on {training.get('threads')} CPU "
            f"thread(s). Recipe: `make train-mg_finder` (`python -m models.training.train_mg_finder`).",
            "",
            "## Metrics (held-out test split, as served)",
            "",
            finder_markdown(report, "Held-out figures").split("\n", 2)[2],
            "",
            verdict(report),
            "",
            "## Known limits",
            "",
            text.get("limits", ""),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a folder holding mias/ (or the mias folder itself)")
    parser.add_argument("--model-dir", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--split", choices=("test", "val", "train", "all"), default="test")
    parser.add_argument("--output", type=Path, default=Path("var/evaluation/mg_finder"))
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--card", type=Path, default=None, help="also write <role>.md into this folder")
    args = parser.parse_args(argv)
    report = evaluate_finder(args.data, args.model_dir, args.split, args.resamples)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{MG_FINDER_ROLE}.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (args.output / f"{MG_FINDER_ROLE}.md").write_text(finder_markdown(report) + "\n")
    for path in save_finder_figures(report, args.output):
        print(f"figure: {path}")
    if args.card is not None:
        from models.families.catalogue import card_texts

        entry = read_manifest(args.model_dir)[MG_FINDER_ROLE]
        args.card.mkdir(parents=True, exist_ok=True)
        card = args.card / f"{MG_FINDER_ROLE}.md"
        card.write_text(finder_card(entry, report, card_texts().get(MG_FINDER_ROLE, {})))
        print(f"card: {card}")
    print(finder_markdown(report))


if __name__ == "__main__":
    main()
