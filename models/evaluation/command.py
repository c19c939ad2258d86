"""``breastai evaluate``: score exported models on a labelled folder and write honest reports.

Runs the models exactly as served (ONNX Runtime through
:mod:`models.inference.family_scorer` and :mod:`models.inference.pipeline`; no torch), on any
folder laid out like ``shared/datasets``: ``<name>/images/``,
``<name>/masks/`` and ``<name>/labels.csv`` (or one such folder).

For every classification family: AUC with a 1,000-resample bootstrap 95 %
CI, sensitivity / specificity / PPV / NPV / accuracy at the model's stored
operating point, Brier score and expected calibration error, per dataset
and per scanner; ROC and reliability PNGs; DeLong tests between families
scored on the same cases. Families see the ground-truth lesion box (the
largest mask region, as the papers crop), so their numbers are not mixed
with the segmenter's misses. Where the headline model is asked for (the
default), the served B-mode pipeline is also judged as the SR reports it:
segmenter-found lesions, the image's highest headline score, normal images
included, per patient and a detection FROC (:mod:`models.evaluation.served`;
``--served-only`` runs that part alone and merges it into a report already
written). For the segmenter: Dice, IoU and HD95 per lesion image. With
both DLR models, the BI-RADS 4A co-decision is tallied on the cases
assessed 4A. For the mammography lesion finder (``mg_finder``),
on the data's mini-MIAS images: image-level AUC, FROC and DL-M on the
regions it found (:mod:`models.evaluation.finder`), with a FROC plot.

``--split test`` (default) keeps the project's held-out split of the
development data (see :mod:`models.datasets`); use ``--split all`` for
a site's own data, which never took part in training.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.datasets import (
    EXCLUDED,
    Record,
    birads_high,
    dataset_names,
    load_records,
    mask_box,
    mias_findings,
    read_gray,
    read_mask,
)
from models.errors import DatasetError, EvaluationError
from models.evaluation.finder import evaluate_finder, finder_markdown, save_finder_figures
from models.evaluation.report import (
    CasePrediction,
    SegmentationRow,
    classification_report,
    compare_families,
    report_markdown,
    segmentation_report,
)
from models.evaluation.served import (
    BENIGN_VS_MALIGNANT,
    MALIGNANT_VS_REST,
    evaluate_served,
    headline_role,
    save_served_figures,
    served_markdown,
    with_served,
)
from models.evaluation.stats import dice, hausdorff95, iou
from models.inference.consensus import load_consensus_scorer
from models.inference.decisions import (
    BIRADS_BIOPSY_LIKELIHOOD,
    BIRADS_MALIGNANCY_LIKELIHOOD,
    BM_ROLE,
    co_decision,
    lh_score,
)
from models.inference.family_scorer import ClinicalContext
from models.inference.findings import FamilyScore, ModelInfo
from models.inference.lesions import Component
from models.inference.manifest import ConsensusSpec, Modality, ModelKind, ScorerSpec
from models.inference.pipeline import (
    SEGMENTATION_ROLES,
    SEGMENTER_ROLE,
    Segmentation,
    load_scorer,
    load_segmentation,
    segment_lesions,
)
from models.inference.preprocess import Box
from models.inference.registry import ModelEntry, read_manifest
from models.inference.scorers import LesionView

STATISTICS_NOTE = (
    "AUC intervals: percentile bootstrap over patients (all images of one patient, or one group of near-duplicate "
    "images, drawn together); DeLong tests with Obuchowski's (1997) clustered covariance; near-duplicate groups that "
    "straddle splits or disagree on the label are left out (models/near_duplicates.csv)"
)


@dataclass(frozen=True)
class ScoredCase:
    record: Record
    label: int
    score: FamilyScore


def _label(record: Record, task: str) -> int | None:
    return record.malignant if task == "malignancy" else birads_high(record.birads)


def lesion_boxes(records: Sequence[Record]) -> list[tuple[Record, Box]]:
    """Every record with a lesion mask, with the box of its largest mask region."""
    boxes = []
    for record in records:
        if record.mask_path is None:
            continue
        box = mask_box(read_mask(record, read_gray(record.image_path).shape))
        if box is not None:
            boxes.append((record, box))
    return boxes


def score_family(
    entry: ModelEntry,
    model_dir: Path,
    lesions: Sequence[tuple[Record, Box]],
    entries: Mapping[str, ModelEntry] | None = None,
    segmentation: Callable[[], Segmentation] | None = None,
) -> list[ScoredCase]:
    """Score every lesion that has a label for the family's task.

    A lexicon-descriptor model reads the lesion's outline as served: the
    served segmentation's component that overlaps the ground-truth box most
    (none: the model's own fallback, which its notes record).

    ``entries`` (the folder's manifest) is read when not given; ``segmentation``
    gives the served segmentation when a lexicon model needs it (loaded from
    ``entries`` when not given).

    Raises
    ------
    EvaluationError
        ``entry`` is a consensus (scored from its members by :func:`score_consensus`).
    ModelRegistryError
        The entry is incomplete (:class:`~models.errors.ManifestError`) or a file fails its checksum.
    """
    entries = read_manifest(model_dir) if entries is None else entries
    scorer = load_scorer(entry, entries, model_dir)
    if scorer.members:
        raise EvaluationError(f"{entry.role} is a consensus: it is scored from its members")
    outlines: Segmentation | None = None
    if entry.spec.kind is ModelKind.LEXICON:
        outlines = segmentation() if segmentation is not None else load_segmentation(entries, model_dir)
    cases = []
    for record, box in lesions:
        label = _label(record, scorer.task)
        if label is None:
            continue
        gray = read_gray(record.image_path)
        mask = served_mask_at(segment_lesions(*outlines, gray), box) if outlines is not None else None
        context = ClinicalContext(age_years=record.age_years, pixel_spacing_mm=record.pixel_spacing_mm)
        cases.append(ScoredCase(record, label, scorer.score_lesion(LesionView(gray, box, mask, context), {})))
    return cases


def served_mask_at(components: Sequence[Component], box: Box) -> npt.NDArray[np.bool_] | None:
    """The served lesion component with the most pixels inside ``box`` (x, y, w, h), or None when none reaches it."""
    x, y, w, h = box
    overlaps = [int(c.mask[y : y + h, x : x + w].sum()) for c in components]
    if not overlaps or max(overlaps) == 0:
        return None
    return components[int(np.argmax(overlaps))].mask


def score_consensus(
    entry: ModelEntry,
    entries: Mapping[str, ModelEntry],
    model_dir: Path,
    member_cases: Mapping[str, Sequence[ScoredCase]],
) -> list[ScoredCase]:
    """The consensus of ``entry`` on every case all its members scored (``member_cases`` keyed by member role)."""
    consensus = load_consensus_scorer(entry, entries, model_dir)
    by_id = [{c.record.image_id: c for c in member_cases[role]} for role in consensus.members]
    cases = []
    for case in member_cases[consensus.members[0]]:
        members = [index.get(case.record.image_id) for index in by_id]
        if any(m is None for m in members):
            continue
        shape = read_gray(case.record.image_path).shape
        scores = {role: m.score for role, m in zip(consensus.members, members, strict=True) if m is not None}
        cases.append(ScoredCase(case.record, case.label, consensus.combine(scores, (int(shape[0]), int(shape[1])))))
    return cases


def segmentation_rows(
    model_dir: Path, records: Sequence[Record], segmentation: Segmentation | None = None
) -> list[SegmentationRow]:
    """Dice, IoU and HD95 (pixels) of the served segmentation on every image with a lesion mask.

    As served: the reported components (minimum area, at most three), each
    re-outlined by the refiner where the folder has one. ``segmentation`` is
    loaded from the folder when not given.
    """
    # The families, and their consistency, are checked where they are scored.
    if segmentation is None:
        segmentation = load_segmentation(read_manifest(model_dir), model_dir)
    segmenter, entry, refiner = segmentation
    rows = []
    for record in records:
        if record.mask_path is None or record.malignant is None:
            continue
        gray = read_gray(record.image_path)
        truth = read_mask(record, gray.shape).astype(bool)
        if not truth.any():
            continue
        predicted = np.zeros(truth.shape, dtype=bool)
        for component in segment_lesions(segmenter, entry, refiner, gray):
            predicted |= component.mask
        rows.append(
            SegmentationRow(
                record.image_id,
                record.dataset,
                record.device,
                dice(predicted, truth),
                iou(predicted, truth),
                hausdorff95(predicted, truth),
                record.patient,
            )
        )
    return rows


def four_a_tally(lh: Sequence[ScoredCase], bm: Sequence[ScoredCase]) -> dict[str, Any]:
    """The paper's 4A re-stratification on cases assessed BI-RADS 4A, with the malignancy rate per recommendation."""
    bm_by_id = {c.record.image_id: c for c in bm}
    tally: dict[str, Counter[str]] = {}
    for case in lh:
        other = bm_by_id.get(case.record.image_id)
        if other is None or case.record.birads != "4a" or case.record.malignant is None:
            continue
        decision = co_decision(
            case.score.probability, other.score.probability, case.score.threshold, other.score.threshold
        )
        tally.setdefault(decision.recommendation.value, Counter())[
            "malignant" if case.record.malignant else "benign"
        ] += 1
    return {
        recommendation: {"n": sum(counts.values()), "malignant": counts["malignant"], "benign": counts["benign"]}
        for recommendation, counts in sorted(tally.items())
    }


READER_ROLE = "birads_reader"
READER_NAME = "Radiologists' BI-RADS final assessment (reference reader)"
READER_NOTE = (
    "Not a model: the category the radiologists assigned, as the BI-RADS Atlas's likelihood of malignancy, "
    "positive from category 4 (biopsy recommended). They had the whole examination and the history, and "
    "their category decided which lesions went to biopsy."
)


def birads_reader(cases: Sequence[ScoredCase]) -> list[ScoredCase]:
    """The radiologists' own final assessment of the same lesions, scored as a reference reader.

    Each lesion's BI-RADS category (``labels.csv``) becomes the Atlas's
    likelihood of malignancy (:data:`models.inference.decisions.BIRADS_MALIGNANCY_LIKELIHOOD`),
    called positive from category 4 on (biopsy recommended). Lesions without
    a category (BUSI), or with 0 or 6, are left out. The readers had the whole
    examination, live scanning and the history, and their category decided
    which lesions went to biopsy: a reference point for the families' AUC on
    the same cases, not a like-for-like opponent.
    """
    reference: list[ScoredCase] = []
    for case in cases:
        likelihood = BIRADS_MALIGNANCY_LIKELIHOOD.get(case.record.birads)
        if likelihood is None:
            continue
        score = FamilyScore(
            READER_ROLE,
            "malignancy",
            ModelInfo(READER_NAME, "ACR BI-RADS Atlas 5th ed.", ""),
            likelihood,
            BIRADS_BIOPSY_LIKELIHOOD,
            likelihood >= BIRADS_BIOPSY_LIKELIHOOD,
            np.zeros((1, 1), np.float32),
            case.score.roi_box,
        )
        reference.append(ScoredCase(case.record, case.label, score))
    return reference


def _predictions(cases: Sequence[ScoredCase]) -> list[CasePrediction]:
    return [
        CasePrediction(
            c.record.image_id, c.record.dataset, c.record.device, c.label, c.score.probability, c.record.patient
        )
        for c in cases
    ]


VARIANT_SUFFIX = "_only_probability"


def variant_predictions(cases: Sequence[ScoredCase]) -> dict[str, list[CasePrediction]]:
    """The comparison models a family's paper reports beside it (CLDLR: DLR only, clinical only), by name.

    They come from the score's ``<name>_only_probability`` details, and only
    where every case has them.
    """
    names = sorted({k for c in cases for k in c.score.details if k.endswith(VARIANT_SUFFIX)})
    variants = {}
    for key in names:
        values = [c.score.details.get(key) for c in cases]
        if all(isinstance(v, float) for v in values):
            variants[f"{key.removesuffix(VARIANT_SUFFIX)} only"] = [
                CasePrediction(
                    c.record.image_id, c.record.dataset, c.record.device, c.label, float(v), c.record.patient
                )
                for c, v in zip(cases, values, strict=True)
                if isinstance(v, float)
            ]
    return variants


def _modality(entries: Mapping[str, ModelEntry], role: str) -> Modality:
    """The modality of a scored role; the radiologists' reference reader (not in the manifest) read ultrasound."""
    return entries[role].spec_as(ScorerSpec).modality if role in entries else Modality.US


def _labelled_records(data: Path, without_image: list[str]) -> list[Record]:
    """Every labelled image of the ultrasound folders in ``data`` (rows without an image appended to
    ``without_image``); :class:`EvaluationError` where the data cannot be read.
    """
    root = data.parent if (data / "labels.csv").is_file() else data
    try:
        names = dataset_names(data)
        return load_records(root, names, missing=without_image) if names else []
    except DatasetError as exc:
        raise EvaluationError(f"cannot read the labelled data in {data}: {exc}") from exc


def evaluate(
    data: Path, model_dir: Path, families: Sequence[str], split: str, output: Path, resamples: int = 1000
) -> dict[str, Any]:
    """Run every requested model on ``data`` and write report.json, predictions.csv and PNGs to ``output``.

    Raises
    ------
    EvaluationError
        A requested model is not in the manifest, the data cannot be read, or nothing in it is labelled to score
        (no image of ``split``, no lesion any requested model could score).
    DatasetError
        An image or mask file of the data cannot be read.
    ModelRegistryError
        A requested model's entry is incomplete (:class:`~models.errors.ManifestError`) or a file fails its checksum.
    """
    from models.evaluation.plots import save_reliability_png, save_roc_png

    entries = read_manifest(model_dir)
    unknown = [f for f in families if f not in entries]
    if unknown:
        raise EvaluationError(
            f"models {', '.join(unknown)} are not in {model_dir / 'manifest.json'} "
            f"(it has: {', '.join(sorted(entries))})"
        )
    # A finder scores no given lesion: it is judged on the images it searches (models.evaluation.finder).
    finders = [f for f in families if entries[f].kind is ModelKind.MG_FINDER]
    families = [f for f in families if f not in finders]
    for family in families:
        entries[family].spec_as(ScorerSpec)  # every requested model complete before hours of scoring start
    root = data.parent if (data / "labels.csv").is_file() else data
    without_image: list[str] = []
    records = _labelled_records(data, without_image)
    everything = len(records)
    excluded = sum(r.split == EXCLUDED for r in records)
    records = [r for r in records if r.split != EXCLUDED and (split == "all" or r.split == split)]
    us_lesions = lesion_boxes(records)
    # mini-MIAS only where it was asked for: the folder itself, or a root that holds it.
    mias_asked = data.name == "mias" or not (data / "labels.csv").is_file()
    mg_lesions = [
        (r, box) for r, box in (mias_findings(root) if mias_asked else []) if split == "all" or r.split == split
    ]
    if not records and not mg_lesions:
        raise EvaluationError(
            f"nothing labelled to score in {data}: "
            + (
                f"none of its {everything} images is in the {split} split (--split all scores every one)"
                if everything
                else "no dataset folder in it (expected <name>/labels.csv, images/, masks/, or one such folder)"
            )
        )
    report: dict[str, Any] = {
        "data": str(data),
        "split": split,
        "images": len(records),
        "excluded_near_duplicates": excluded,
        "statistics": STATISTICS_NOTE,
        "families": {},
    }
    if without_image:
        # A site's folder with rows whose images were not copied: say so, or its n would silently shrink.
        report["rows_without_image"] = {"count": len(without_image), "first": without_image[:20]}
        print(
            f"breastai evaluate: {len(without_image)} labelled row(s) have no image in images/ and are not scored "
            f"(first: {', '.join(without_image[:5])})",
            file=sys.stderr,
        )
    # The segmenter and refiner are read and verified once, when first needed (a lexicon model's outlines, or the
    # segmentation rows), and shared.
    served_segmentation = cache(lambda: load_segmentation(entries, model_dir))
    scored: dict[str, list[ScoredCase]] = {}
    members_only: dict[str, list[ScoredCase]] = {}  # scored for a consensus but not asked for
    for family in families:
        spec = entries[family].spec_as(ScorerSpec)
        lesions = mg_lesions if spec.modality is Modality.MG else us_lesions
        if isinstance(spec, ConsensusSpec):
            for member in spec.members:
                if member not in scored and member not in members_only and member in entries:
                    members_only[member] = score_family(
                        entries[member], model_dir, lesions, entries, served_segmentation
                    )
            cases = score_consensus(entries[family], entries, model_dir, {**members_only, **scored})
        elif family in members_only:
            cases = members_only.pop(family)
        else:
            cases = score_family(entries[family], model_dir, lesions, entries, served_segmentation)
        if not cases:
            report["families"][family] = {"note": "no labelled lesion for this task in the data"}
            continue
        scored[family] = cases
        entry = entries[family]
        report["families"][family] = {
            "model": {"name": entry.name, "version": entry.version, "sha256": entry.sha256, "file": entry.file},
            "task": cases[0].score.task,
            "operating_point": cases[0].score.threshold,
            # Per patient only for ultrasound: a mini-MIAS patient is a woman with findings in either breast, not
            # views of one lesion.
            "classification": classification_report(
                _predictions(cases),
                threshold=cases[0].score.threshold,
                resamples=resamples,
                pool_patients=spec.modality is Modality.US,
            ),
        }
        variants = variant_predictions(cases)
        if variants:
            report["families"][family]["variants"] = compare_families({family: _predictions(cases), **variants})
    outlined = segmentation_rows(model_dir, records, served_segmentation()) if SEGMENTER_ROLE in entries else []
    finder_reports = {role: _finder_report(role, root, model_dir, split, resamples, mias_asked) for role in finders}
    judged_finders = {role: body for role, body in finder_reports.items() if "image_level" in body}
    if finder_reports:
        report["finders"] = finder_reports
    if not scored and not outlined and not judged_finders:
        # Every row of the report would read n=None: refuse rather than write a report that looks like a result.
        raise EvaluationError(
            f"nothing labelled to score in {data}: no lesion with a mask and a label for "
            f"{', '.join(families) or 'any model'} among its {len(records) + len(mg_lesions)} images of the "
            f"{split} split"
        )
    output.mkdir(parents=True, exist_ok=True)
    # What the SR reports (segmenter-found lesions, the headline score), where the headline model was asked for.
    served = (
        evaluate_served(records, model_dir, resamples, output)
        if records and headline_role(model_dir) in families
        else None
    )
    us_malignancy = [
        c for f, c in scored.items() if _modality(entries, f) is Modality.US and c[0].score.task == "malignancy"
    ]
    reference = birads_reader(us_malignancy[0]) if us_malignancy else []
    if len({c.label for c in reference}) == 2:
        scored[READER_ROLE] = reference
        report["families"][READER_ROLE] = {
            "model": {"name": READER_NAME, "version": "ACR BI-RADS Atlas 5th ed.", "sha256": "", "file": ""},
            "reference": READER_NOTE,
            "task": "malignancy",
            "operating_point": BIRADS_BIOPSY_LIKELIHOOD,
            "classification": classification_report(
                _predictions(reference), threshold=BIRADS_BIOPSY_LIKELIHOOD, resamples=resamples
            ),
        }
    # Families are compared, and plotted together, only within one modality and task (same cases).
    by_task: dict[str, dict[str, list[ScoredCase]]] = {}
    for family, cases in scored.items():
        modality = _modality(entries, family)
        key = cases[0].score.task if modality is Modality.US else f"{modality.value.lower()}_{cases[0].score.task}"
        by_task.setdefault(key, {})[family] = cases
    # The readers are compared with each family on its own (Holm over those pairs), not mixed into the families' tests.
    models_only = {task: {f: c for f, c in group.items() if f != READER_ROLE} for task, group in by_task.items()}
    report["comparisons"] = {
        task: compare_families({f: _predictions(c) for f, c in group.items()})
        for task, group in models_only.items()
        if len(group) > 1
    }
    report["comparisons_with_readers"] = {
        task: compare_families({f: _predictions(c) for f, c in group.items()}, reference=READER_ROLE)
        for task, group in by_task.items()
        if READER_ROLE in group and len(group) > 1
    }
    for task, group in by_task.items():
        curves = {f: ([c.label for c in cases], [c.score.probability for c in cases]) for f, cases in group.items()}
        save_roc_png(output / f"roc_{task}.png", curves, title=f"ROC, {task}")
        # The readers' "probabilities" are the Atlas's category midpoints: no calibration to show.
        save_reliability_png(
            output / f"reliability_{task}.png",
            {f: v for f, v in curves.items() if f != READER_ROLE},
            title=f"Calibration, {task}",
        )
    lh_role = lh_score({role: role for role in scored})
    if lh_role is not None and BM_ROLE in scored:
        report["four_a_co_decision"] = four_a_tally(scored[lh_role], scored[BM_ROLE])
        report["four_a_lh_model"] = lh_role
    if outlined:  # a mammography-only folder has no ultrasound masks to score
        report["segmentation"] = segmentation_report(outlined, resamples=resamples)
    with (output / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["family", "id", "dataset", "device", "label", "probability", "positive"])
        for family, cases in scored.items():
            for c in cases:
                writer.writerow(
                    [
                        family,
                        c.record.image_id,
                        c.record.dataset,
                        c.record.device,
                        c.label,
                        f"{c.score.probability:.6f}",
                        int(c.score.positive),
                    ]
                )
    if served is not None:
        report = with_served(report, served)
        save_served_figures(served, output)
    for role, body in judged_finders.items():
        save_finder_figures(body, output, role)
    write_report(report, output)
    return report


def write_report(report: Mapping[str, Any], output: Path) -> None:
    """Write ``report.json`` and ``report.md`` (:func:`report_markdown_of`) into ``output``."""
    (output / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (output / "report.md").write_text(report_markdown_of(report))


def report_markdown_of(report: Mapping[str, Any]) -> str:
    """report.md from report.json's content: rows without an image, the served figures, the segmentation, each
    family, the comparisons and the finders, in that order.
    """
    markdown = (
        [report_markdown(segmentation=report.get("segmentation"), title="Segmentation")]
        if "segmentation" in report
        else []
    )
    if "served" in report:
        markdown.insert(0, served_markdown(report["served"]))
    without_image = report.get("rows_without_image")
    if without_image:
        markdown.insert(
            0,
            f"**{without_image['count']} labelled row(s) had no image in `images/` and were not scored** "
            f"(first: {', '.join(without_image['first'])}).",
        )
    for family, body in report["families"].items():
        if "classification" in body:
            markdown.append(report_markdown(classification=body["classification"], title=family))
        if "reference" in body:
            markdown.append(f"{body['model']['name']}. {body['reference']}")
        if "variants" in body:
            markdown.append(
                report_markdown(comparisons=body["variants"], title=f"{family}: the paper's comparison models")
            )
    for task, comparisons in report["comparisons"].items():
        markdown.append(report_markdown(comparisons=comparisons, title=f"DeLong comparisons, {task}"))
    for task, comparisons in report["comparisons_with_readers"].items():
        markdown.append(
            report_markdown(comparisons=comparisons, title=f"DeLong comparisons with the radiologists' BI-RADS, {task}")
        )
    for role, body in report.get("finders", {}).items():
        if "image_level" in body:
            markdown.append(finder_markdown(body, f"{role} (mammography lesion finder)"))
    return "\n\n".join(markdown) + "\n"


def evaluate_served_only(
    data: Path, model_dir: Path, split: str, output: Path, resamples: int = 1000
) -> dict[str, Any]:
    """Judge the served B-mode pipeline alone and merge its figures into the report already in ``output``.

    The served block (:mod:`models.evaluation.served`) replaces any earlier one; every other part of
    report.json is kept as it is, report.md is rewritten from it (the other sections come out as before) and
    ``froc_us_served.png`` and ``served_predictions.csv`` are written beside them. Nothing else is scored.

    Raises
    ------
    EvaluationError
        ``output`` holds no report.json, the report was written for other data or another split, the data hold no
        image of ``split``, or the model folder has no served B-mode pipeline.
    ModelRegistryError, DatasetError
        As :func:`evaluate`.
    """
    path = output / "report.json"
    if not path.is_file():
        raise EvaluationError(f"--served-only merges into a report breastai evaluate wrote: {path} is missing")
    report: dict[str, Any] = json.loads(path.read_text())
    if report.get("data") != str(data) or report.get("split") != split:
        raise EvaluationError(
            f"{path} was written for split {report.get('split')!r} of {report.get('data')!r}, not split {split!r} of "
            f"{str(data)!r}: run the whole evaluation instead"
        )
    if headline_role(model_dir) is None:
        raise EvaluationError(f"{model_dir / 'manifest.json'} has no B-mode pipeline to judge (no segmenter)")
    records = [r for r in _labelled_records(data, []) if r.split != EXCLUDED and (split == "all" or r.split == split)]
    if not records:
        raise EvaluationError(f"no ultrasound image of the {split} split in {data}")
    served = evaluate_served(records, model_dir, resamples, output)
    merged = with_served(report, served)
    save_served_figures(served, output)
    markdown = output / "report.md"
    (output / "report.json").write_text(json.dumps(merged, indent=2, allow_nan=False))
    kept = markdown.read_text() if markdown.is_file() else None
    markdown.write_text(merged_markdown(kept, report, served) if kept is not None else report_markdown_of(merged))
    return merged


def merged_markdown(markdown: str, report: Mapping[str, Any], served: Mapping[str, Any]) -> str:
    """``markdown`` (the report.md written for ``report``) with its served section put in or replaced, the rest of it
    kept byte for byte; regenerated from the merged report where the earlier served section cannot be found in it.

    The section goes where :func:`report_markdown_of` puts it: first, after the line on rows without an image.
    """
    section = served_markdown(served)
    if "served" in report:
        earlier = served_markdown(report["served"]) + "\n\n"
        if earlier not in markdown:
            return report_markdown_of(with_served(report, served))
        markdown = markdown.replace(earlier, "", 1)
    if report.get("rows_without_image"):
        first, rest = markdown.split("\n\n", 1)
        return f"{first}\n\n{section}\n\n{rest}"
    return f"{section}\n\n{markdown}"


def _finder_report(
    role: str, root: Path, model_dir: Path, split: str, resamples: int, mias_asked: bool
) -> dict[str, Any]:
    """The finder's figures on the data's mini-MIAS images, or a note where the data hold none."""
    if not mias_asked or not (root / "mias" / "labels.csv").is_file():
        return {"note": "no mini-MIAS images in the data"}
    return evaluate_finder(root, model_dir, split, resamples, role)


def run_evaluate(args: argparse.Namespace) -> int:
    entries = read_manifest(args.model_dir)
    # The three-plane family is judged on its own synthetic volumes by its trainer (models/evaluation/three_plane.py).
    families = [f for f in args.families.split(",") if f] or [
        role
        for role in sorted(entries)
        if role not in SEGMENTATION_ROLES and entries[role].kind is not ModelKind.THREE_PLANE
    ]
    started = time.monotonic()
    if args.served_only:
        report = evaluate_served_only(args.data, args.model_dir, args.split, args.output, args.resamples)
    else:
        report = evaluate(args.data, args.model_dir, families, args.split, args.output, args.resamples)
    served = report.get("served")
    if served is not None:
        headline, images = served["pipeline"]["headline"], served["images"]
        bm, rest = served[BENIGN_VS_MALIGNANT].get("all", {}), served[MALIGNANT_VS_REST].get("all", {})
        print(
            f"{'served':14s} {headline} n={images['n']} benign-vs-malignant AUC={bm.get('auc')} CI={bm.get('auc_ci')} "
            f"malignant-vs-rest AUC={rest.get('auc')} CI={rest.get('auc_ci')}"
        )
    if args.served_only:
        print(f"served evaluation: {time.monotonic() - started:.0f} s")
    for family, body in report["families"].items():
        overall = body.get("classification", {}).get("all", {})
        print(f"{family:14s} n={overall.get('n')} AUC={overall.get('auc')} CI={overall.get('auc_ci')}")
    for role, body in report.get("finders", {}).items():
        if "image_level" not in body:
            print(f"{role:14s} {body.get('note')}")
            continue
        image_auc = body["image_level"].get("auc") or {}
        froc = body["froc"]["sensitivity_at_fp_per_image"]
        sensitivities = " ".join(f"{rate}:{estimate['value']}" for rate, estimate in froc.items())
        print(
            f"{role:14s} n={body['image_level']['n']} image AUC={image_auc.get('value')} CI={image_auc.get('ci95')} "
            f"FROC sensitivity at FP/image {sensitivities}"
        )
    if args.cards:
        from models.evaluation.cards import write_cards

        for path in write_cards(report, entries, args.cards):
            print(f"card: {path}")
    print(f"report: {args.output / 'report.md'}")
    return 0
