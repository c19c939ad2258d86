"""Export the trained reference models to ONNX, evaluate them as served, write cards.

Usage::

    python -m models.training.export_reference --datasets ../shared/datasets

Steps: load each part's best checkpoint; export to ONNX (opset 18); convert
to float16 and keep fp16 only when its outputs
stay within tolerance of PyTorch on real validation images; write the
manifest with sha256; then evaluate the exported files through the very
serving pipeline (ONNX Runtime) on the held-out test split, pick the
operating point on the validation split, and generate the model cards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxconverter_common import float16

from models.datasets import Record, load_records, mask_box, read_gray, read_mask
from models.evaluation.stats import auc, bootstrap_ci, dice, mean_ci, operating_point, youden_threshold
from models.families.segmentation.network import (
    CamClassifier,
    CamExportWrapper,
    SegmenterExportWrapper,
    lesion_refiner,
    lesion_segmenter,
    recalibrate_batch_norm,
    roi_classifier,
)
from models.inference.pipeline import BModePipeline, load_bmode_pipeline
from models.inference.preprocess import crop, expand_box, standardise
from models.inference.refine import WINDOW_EXPAND
from models.inference.registry import BUNDLED_MODEL_DIR, ModelEntry, merge_into_manifest, sha256_of

VERSION = "0.1.0"
REFINER_VERSION = "0.5.0"
FP16_TOLERANCE = 0.05  # max abs difference of logits accepted for the fp16 file
ROI_EXPAND = 0.2
CARDS_DIR = Path(__file__).resolve().parents[1] / "cards"


def _export(
    module: torch.nn.Module, size: int, outputs: list[str], destination: Path, probes: list[np.ndarray]
) -> dict[str, Any]:
    """Export fp32, try fp16, keep fp16 if its logits stay within tolerance on ``probes``."""
    import onnxruntime as ort

    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            (torch.zeros(1, 1, size, size),),
            str(fp32),
            input_names=["image"],
            output_names=outputs,
            opset_version=18,
            dynamo=False,
        )
        # Inputs and outputs become float16 too: OnnxRuntimeBackend casts on the way in and out. (keep_io_types=True
        # breaks graphs where an output tensor, such as the feature map, also feeds another node.)
        half = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=False)
        fp16 = Path(tmp) / "model16.onnx"
        onnx.save(half, str(fp16))
        worst = {"fp32": 0.0, "fp16": 0.0}
        for label, path in (("fp32", fp32), ("fp16", fp16)):
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for probe in probes:
                with torch.no_grad():
                    reference = module(torch.from_numpy(probe))
                reference_logits = (reference[0] if isinstance(reference, tuple) else reference).numpy()
                feed = probe.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else probe
                got = session.run(["logits"], {"image": feed})[0].astype(np.float32)
                worst[label] = max(worst[label], float(np.abs(got - reference_logits).max()))
        chosen = fp16 if worst["fp16"] <= FP16_TOLERANCE else fp32
        destination.write_bytes(chosen.read_bytes())
    return {
        "precision": "float16" if chosen == fp16 else "float32",
        "max_abs_logit_diff_fp32": worst["fp32"],
        "max_abs_logit_diff_fp16": worst["fp16"],
    }


RECIPE_KEYS = ("epochs", "batch_size", "learning_rate", "seed")


def training_recipe(config: dict[str, Any], epochs_run: int) -> dict[str, Any]:
    """The run's recipe as the manifest records it, so that a test can hold ``make train`` to the shipped model's.

    ``epochs_run`` differs from the recipe's ``epochs`` where ``--max-minutes`` stopped the run early.
    ``autocast`` is the arithmetic the run trained in (``None``: fp32), as the families' exports record it,
    so a card can say whether ``--bf16`` rebuilds the model.
    """
    return {
        **{key: config[key] for key in RECIPE_KEYS},
        "epochs_run": epochs_run,
        "autocast": "bfloat16" if config.get("bf16") else None,
    }


def _load(part: str, work: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    state = torch.load(work / part / "best.pt", map_location="cpu", weights_only=False)
    config = json.loads((work / part / "config.json").read_text())
    model = lesion_segmenter() if part == "segmenter" else lesion_refiner() if part == "refiner" else roi_classifier()
    model.load_state_dict(state["model"])
    last = torch.load(work / part / "last.pt", map_location="cpu", weights_only=False)
    return model, {
        "epoch": int(state["epoch"]),
        "val_score": float(state["score"]),
        "config": config,
        "epochs_run": int(last["epoch"]) + 1,
    }


def _evaluate_segmenter(pipeline: BModePipeline, records: list[Record]) -> dict[str, Any]:
    per_dataset: dict[str, list[float]] = {}
    empty_correct: list[bool] = []
    for record in records:
        gray = read_gray(record.image_path)
        truth = read_mask(record, gray.shape).astype(bool)
        if truth.any():
            predicted = pipeline.lesion_probability(gray) >= 0.5
            per_dataset.setdefault(record.dataset, []).append(dice(predicted, truth))
        else:
            # What the service would report: lesions after the component filter.
            empty_correct.append(not pipeline.analyse(gray).lesions)
    every = [v for values in per_dataset.values() for v in values]
    result: dict[str, Any] = {
        "dice_mean": float(np.mean(every)),
        "dice_ci95": mean_ci(every),
        "n_lesion_images": len(every),
    }
    result["per_dataset"] = {
        name: {"dice_mean": float(np.mean(v)), "dice_ci95": mean_ci(v), "n": len(v)}
        for name, v in sorted(per_dataset.items())
    }
    if empty_correct:
        result["normal_images_without_false_lesion"] = {
            "fraction": float(np.mean(empty_correct)),
            "n": len(empty_correct),
        }
    return result


def _roi_scores(pipeline: BModePipeline, records: list[Record]) -> tuple[list[int], list[float], list[str]]:
    labels, scores, datasets = [], [], []
    for record in records:
        if record.malignant is None:
            continue
        gray = read_gray(record.image_path)
        box = mask_box(read_mask(record, gray.shape))
        if box is None:
            continue
        lesion = pipeline.score_lesion(gray, box, np.zeros((1, 2), np.float32), 0)
        labels.append(record.malignant)
        scores.append(lesion.malignancy_probability)
        datasets.append(record.dataset)
    return labels, scores, datasets


def _auc_block(labels: list[int], scores: list[float]) -> dict[str, Any]:
    return {
        "auc": auc(labels, scores),
        "auc_ci95": bootstrap_ci(labels, scores, resamples=1000),
        "n": len(labels),
        "n_malignant": int(sum(labels)),
    }


def _evaluate_classifier(pipeline: BModePipeline, val: list[Record], test: list[Record]) -> dict[str, Any]:
    val_labels, val_scores, _ = _roi_scores(pipeline, val)
    threshold = youden_threshold(val_labels, val_scores)
    labels, scores, datasets = _roi_scores(pipeline, test)
    result: dict[str, Any] = _auc_block(labels, scores)
    result["operating_point"] = operating_point(labels, scores, threshold).__dict__
    result["per_dataset"] = {}
    for name in sorted(set(datasets)):
        index = [i for i, d in enumerate(datasets) if d == name]
        result["per_dataset"][name] = _auc_block([labels[i] for i in index], [scores[i] for i in index])
    return result


def _evaluate_end_to_end(pipeline: BModePipeline, records: list[Record]) -> dict[str, Any]:
    """Image-level: the highest malignancy probability among detected lesions (0 when none) vs pathology."""
    labels, scores, missed = [], [], 0
    for record in records:
        if record.malignant is None:
            continue
        analysis = pipeline.analyse(read_gray(record.image_path))
        missed += not analysis.lesions
        labels.append(record.malignant)
        scores.append(max((lesion.malignancy_probability for lesion in analysis.lesions), default=0.0))
    return {**_auc_block(labels, scores), "images_with_no_lesion_detected": missed}


def _normal_text(normal: dict[str, Any]) -> str:
    """Say plainly how the served pipeline behaves on images without a lesion."""
    if not normal:
        return "- Not measured on normal images (none in the test split)."
    fraction = float(normal["fraction"])
    if fraction >= 0.9:
        return f"- On normal images it reports no lesion in {fraction:.0%} of cases."
    return (
        f"- False lesions: on normal images it reports no lesion in only {fraction:.0%} of cases (n = {normal['n']}). "
        "It does not decide whether a lesion is present; its outlines are meaningful on images that show one."
    )


def _target_text(metric: str, value: float, target: float, where: str, per_dataset: dict[str, float]) -> str:
    """One honest line on a project quality target, naming the datasets that fall short."""
    verdict = "meets" if value >= target else "is below"
    line = f"- {metric} {value:.3f} on {where} {verdict} the project's target of {target:.2f}"
    short = [f"{name} {v:.3f}" for name, v in sorted(per_dataset.items()) if v < target]
    return line + (f"; below it: {', '.join(short)}." if short else ".")


def _fmt_ci(value: float, ci: tuple[float, float] | list[float]) -> str:
    return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


SPLIT_TEXT = (
    "Development data: BUSI, BUS-BRA and BrEaST-Lesions-USG from `shared/datasets` (the maintainers hold back a "
    "further external test "
    "part that was never seen). Split: BUS-BRA by its patient-level `fold` (fold 4 = test; 1 case in 10 of folds 1-3 = "
    "validation); "
    "BUSI and BrEaST by a stable hash of the image id (20 % test, 10 % validation). See `models/datasets.py`."
)


def _write_cards(
    entries: dict[str, ModelEntry],
    seg: dict[str, Any],
    cls: dict[str, Any],
    e2e: dict[str, Any],
    counts: dict[str, int],
) -> None:
    today = dt.date.today().isoformat()
    s, c = entries["us_segmenter"], entries["us_classifier"]
    seg_rows = "\n".join(
        f"| {n} | {_fmt_ci(v['dice_mean'], v['dice_ci95'])} | {v['n']} |" for n, v in seg["per_dataset"].items()
    )
    cls_rows = "\n".join(
        f"| {n} | {_fmt_ci(v['auc'], v['auc_ci95'])} | {v['n']} ({v['n_malignant']} malignant) |"
        for n, v in cls["per_dataset"].items()
    )
    op = cls["operating_point"]
    common_limits = (
        "- Advisory only, **not for diagnostic use**; every output is an AI score for a radiologist to check.\n"
        "- Trained from scratch (no ImageNet weights can be had here) on a 2-core CPU within a walking-skeleton time "
        "budget; "
        "the paper families of issue 3 replace it.\n"
        "- Development data only: no external validation on an independent site yet; scanners in the data are those of "
        "BUSI, BUS-BRA (4 devices) and BrEaST.\n"
        "- B-mode grayscale breast ultrasound only; colour Doppler / elastography frames, mammography and ABVS are out "
        "of its scope."
    )
    (CARDS_DIR / "us_segmenter.md").write_text(
        f"""# Model card: {s.name} {s.version}

Generated by `python -m models.training.export_reference` on {today}.

## Intended use
Outlines breast lesions on 2D B-mode ultrasound (the scan region of a frame) so that the classifier can score them and
the
report can show their outline and longest diameter. Advisory, not for diagnostic use.

## Model
UNet with an EfficientNet-b0 encoder (MONAI `FlexibleUNet`), 1 input channel, 1 logit channel, input
{s.parameters["input_size"]}x{s.parameters["input_size"]}
(per-image z-score), threshold {s.parameters["threshold"]}, components smaller than
{s.parameters["min_area_fraction"]:.1%} of the image dropped,
at most 3 lesions per image. **Initialisation: random (from scratch).** Loss: BCE + soft Dice; AdamW, cosine schedule;
augmentation:
flip, scale 0.85-1.15, rotation +-10 deg, shift, gamma, multiplicative speckle. Trained {
            s.parameters["train_epoch"] + 1
        } epochs
(best validation epoch kept). Training images: {counts["seg_train"]} (normal images included, as empty masks).

## Data and split
{SPLIT_TEXT}

## Metrics on the held-out test split (served model: ONNX Runtime, {s.parameters["precision"]})
Dice over test images that have a lesion, 95 % CI by 1,000 bootstrap resamples of images:
**{_fmt_ci(seg["dice_mean"], seg["dice_ci95"])}**, n = {seg["n_lesion_images"]}.

| dataset | Dice | n |
|---|---|---|
{seg_rows}

Normal test images (BUSI "normal") on which the served pipeline reports no lesion:
{seg.get("normal_images_without_false_lesion", {}).get("fraction", float("nan")):.3f} (n =
{seg.get("normal_images_without_false_lesion", {}).get("n", 0)}).

## Known limits
{common_limits}
{
            _target_text(
                "Dice",
                seg["dice_mean"],
                0.80,
                "all held-out lesion images",
                {n: v["dice_mean"] for n, v in seg["per_dataset"].items()},
            )
        }
- Burned-in calipers and text in BUSI can be segmented as lesion edges.
{_normal_text(seg.get("normal_images_without_false_lesion", {}))}

## File
`models/weights/{s.file}`, sha256 `{s.sha256}`; fp16 vs fp32 max |logit diff| on validation images:
{s.parameters["max_abs_logit_diff_fp16"]:.4f}.
"""
    )
    (CARDS_DIR / "us_classifier.md").write_text(
        f"""# Model card: {c.name} {c.version}

Generated by `python -m models.training.export_reference` on {today}.

## Intended use
Scores a breast lesion found by the segmenter on 2D B-mode ultrasound as benign vs malignant (malignancy probability
0-1) and
shows its class-activation map. Advisory, not for diagnostic use; the score supports, never replaces, BI-RADS
assessment.

## Model
ResNet-18 (MONAI, standard 7x7 stride-2 stem), head = global average pooling + linear (2 classes), so that the exported
graph
returns the last feature map and the class-activation map (CAM = Grad-CAM for this head). Input: the lesion's box
expanded by
{c.parameters["roi_expand"]:.0%} on every side, {c.parameters["input_size"]}x{c.parameters["input_size"]}, per-image
z-score.
**Initialisation: random (from scratch).** Loss: class-weighted cross-entropy; AdamW, cosine schedule; augmentation: box
jitter
(expansion 5-40 %, shift +-10 %), flip, gamma, speckle. Trained {c.parameters["train_epoch"] + 1} epochs (best
validation AUC kept).
Training lesions: {counts["cls_train"]} (ground-truth boxes).

## Data and split
{SPLIT_TEXT} Normal images are excluded (no lesion to score).

## Metrics on the held-out test split (served model: ONNX Runtime, {c.parameters["precision"]})
ROI classification on ground-truth lesion boxes; AUC 95 % CI by 1,000 bootstrap resamples:
**AUC {_fmt_ci(cls["auc"], cls["auc_ci95"])}**, n = {cls["n"]} ({cls["n_malignant"]} malignant).

| dataset | AUC | n |
|---|---|---|
{cls_rows}

Operating point: threshold {op["threshold"]:.3f} on the malignancy probability, chosen on the validation split by
Youden's J
(it is stored in the manifest as `operating_point`); on test: sensitivity {op["sensitivity"]:.3f}, specificity
{op["specificity"]:.3f},
PPV {op["ppv"]:.3f}, NPV {op["npv"]:.3f}, accuracy {op["accuracy"]:.3f}.

Whole pipeline (segmenter boxes, highest lesion score per image; 0 where nothing was found): AUC {
            _fmt_ci(e2e["auc"], e2e["auc_ci95"])
        },
n = {e2e["n"]}; lesion images with no lesion detected: {e2e["images_with_no_lesion_detected"]}.

## Known limits
{common_limits}
{_target_text("AUC", cls["per_dataset"].get("busbra", {}).get("auc", float("nan")), 0.90, "held-out BUS-BRA", {})}
- External validation (training without BUS-BRA, testing on it; target AUC 0.85) has not been run for this model.

## File
`models/weights/{c.file}`, sha256 `{c.sha256}`; fp16 vs fp32 max |logit diff| on validation images:
{c.parameters["max_abs_logit_diff_fp16"]:.4f}.
"""
    )


def _export_segmenter_only(
    segmenter: torch.nn.Module, seg_meta: dict[str, Any], records: list[Record], val: list[Record], out: Path
) -> None:
    """Export the segmenter into ``out`` and merge it into the manifest; ``breastai evaluate`` measures it and writes
    its card.
    """
    seg_size = int(seg_meta["config"]["input_size"])
    train_images = [standardise(read_gray(r.image_path), seg_size) for r in records if r.split == "train"]
    recalibrate_batch_norm(
        segmenter, (torch.from_numpy(np.concatenate(train_images[i : i + 32])) for i in range(0, len(train_images), 32))
    )
    probes = [standardise(read_gray(r.image_path), seg_size) for r in val[:8]]
    exported = _export(SegmenterExportWrapper(segmenter), seg_size, ["logits"], out / "us_segmenter.onnx", probes)
    entry = ModelEntry(
        role="us_segmenter",
        name="BreastAI-US-UNet-EffB0",
        version=VERSION,
        file="us_segmenter.onnx",
        sha256=sha256_of(out / "us_segmenter.onnx"),
        parameters={
            "input_size": seg_size,
            "threshold": 0.5,
            "min_area_fraction": 0.002,
            "train_epoch": seg_meta["epoch"],
            "training": training_recipe(seg_meta["config"], seg_meta["epochs_run"]),
            **exported,
        },
    )
    merge_into_manifest(out, {"us_segmenter": entry})


def _export_refiner(work: Path, records: list[Record], out: Path) -> None:
    """Export the close-up refiner (:mod:`models.inference.refine`) into ``out`` and merge it into the manifest.

    Batch-norm statistics are recalibrated on training windows at the
    serving rule; fp16 is kept only within tolerance on validation windows.
    """
    from models.training.train_reference import lesion_images, refiner_pair

    refiner, meta = _load("refiner", work)
    size = int(meta["config"]["input_size"])
    train_windows = [
        standardise(refiner_pair(lesion, size, None)[0], size)
        for lesion in lesion_images([r for r in records if r.split == "train"])
    ]
    recalibrate_batch_norm(
        refiner, (torch.from_numpy(np.concatenate(train_windows[i : i + 32])) for i in range(0, len(train_windows), 32))
    )
    probes = [
        standardise(refiner_pair(lesion, size, None)[0], size)
        for lesion in lesion_images([r for r in records if r.split == "val"][:24])[:8]
    ]
    exported = _export(SegmenterExportWrapper(refiner), size, ["logits"], out / "us_refiner.onnx", probes)
    entry = ModelEntry(
        role="us_refiner",
        name="BreastAI-US-BasicUNet-Refiner",
        version=REFINER_VERSION,
        file="us_refiner.onnx",
        sha256=sha256_of(out / "us_refiner.onnx"),
        parameters={
            "input_size": size,
            "threshold": 0.5,
            "window_expand": WINDOW_EXPAND,
            "train_epoch": meta["epoch"],
            "val_dice_windows": round(meta["val_score"], 4),
            "training": training_recipe(meta["config"], meta["epochs_run"]),
            **exported,
        },
    )
    merge_into_manifest(out, {"us_refiner": entry})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work", default="runs/reference")
    parser.add_argument("--out", default=str(BUNDLED_MODEL_DIR))
    parser.add_argument(
        "--no-evaluate",
        action="store_true",
        help="export and write the manifest only (no metrics, no cards): for development",
    )
    parser.add_argument(
        "--with-classifier",
        action="store_true",
        help=(
            "also export the walking skeleton's ResNet-18 ROI classifier (retired from the bundle: the paper families "
            "replace it)"
        ),
    )
    parser.add_argument(
        "--parts",
        default="segmenter,refiner",
        help="comma-separated: segmenter, refiner (each from its best checkpoint under --work)",
    )
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(Path(args.datasets))
    val = [r for r in records if r.split == "val"]
    test = [r for r in records if r.split == "test"]
    parts = {p for p in args.parts.split(",") if p}

    if not args.with_classifier:
        if "segmenter" in parts:
            segmenter, seg_meta = _load("segmenter", work)
            _export_segmenter_only(segmenter, seg_meta, records, val, out)
        if "refiner" in parts:
            _export_refiner(work, records, out)
        return
    segmenter, seg_meta = _load("segmenter", work)
    classifier, cls_meta = _load("classifier", work)
    assert isinstance(classifier, CamClassifier)
    seg_size, cls_size = int(seg_meta["config"]["input_size"]), int(cls_meta["config"]["input_size"])
    train_images = [standardise(read_gray(r.image_path), seg_size) for r in records if r.split == "train"]
    recalibrate_batch_norm(
        segmenter, (torch.from_numpy(np.concatenate(train_images[i : i + 32])) for i in range(0, len(train_images), 32))
    )
    seg_probes = [standardise(read_gray(r.image_path), seg_size) for r in val[:8]]
    cls_probes: list[np.ndarray] = []
    for record in val:
        if record.malignant is not None and len(cls_probes) < 8:
            gray = read_gray(record.image_path)
            box = mask_box(read_mask(record, gray.shape))
            if box:
                cls_probes.append(standardise(crop(gray, expand_box(box, gray.shape, ROI_EXPAND)), cls_size))
    seg_export = _export(SegmenterExportWrapper(segmenter), seg_size, ["logits"], out / "us_segmenter.onnx", seg_probes)
    cls_export = _export(
        CamExportWrapper(classifier), cls_size, ["logits", "features", "cam"], out / "us_classifier.onnx", cls_probes
    )

    entries = {
        "us_segmenter": ModelEntry(
            role="us_segmenter",
            name="BreastAI-US-UNet-EffB0",
            version=VERSION,
            file="us_segmenter.onnx",
            sha256=sha256_of(out / "us_segmenter.onnx"),
            parameters={
                "input_size": seg_size,
                "threshold": 0.5,
                "min_area_fraction": 0.002,
                "train_epoch": seg_meta["epoch"],
                "training": training_recipe(seg_meta["config"], seg_meta["epochs_run"]),
                **seg_export,
            },
        ),
        "us_classifier": ModelEntry(
            role="us_classifier",
            name="BreastAI-US-ROI-ResNet18",
            version=VERSION,
            file="us_classifier.onnx",
            sha256=sha256_of(out / "us_classifier.onnx"),
            parameters={
                "input_size": cls_size,
                "roi_expand": ROI_EXPAND,
                "train_epoch": cls_meta["epoch"],
                **cls_export,
            },
        ),
    }
    merge_into_manifest(out, entries)
    if args.no_evaluate:
        return
    pipeline = load_bmode_pipeline(out)
    seg_metrics = _evaluate_segmenter(pipeline, test)
    cls_metrics = _evaluate_classifier(pipeline, val, test)
    e2e_metrics = _evaluate_end_to_end(pipeline, test)
    entries["us_classifier"].parameters["operating_point"] = cls_metrics["operating_point"]["threshold"]
    merge_into_manifest(out, entries)
    metrics = {"segmenter": seg_metrics, "classifier": cls_metrics, "end_to_end": e2e_metrics}
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    counts = {
        "seg_train": sum(r.split == "train" for r in records),
        "cls_train": sum(r.split == "train" and r.malignant is not None for r in records),
    }
    CARDS_DIR.mkdir(parents=True, exist_ok=True)
    _write_cards(entries, seg_metrics, cls_metrics, e2e_metrics, counts)
    print(json.dumps(metrics, indent=2, default=float))


if __name__ == "__main__":
    main()
