"""Train, export and evaluate the ABVS three-plane model on volumes built from 2-D lesions.

``make train-abvs_three_plane`` runs every stage.

No public ABVS data exists. Every volume here is a construction
(:mod:`models.training.abvs_volumes`): the real 2-D B-mode image is the
central transverse slice, the lesion is swept through neighbouring slices as
an ellipsoid, the tissue around it is the inpainted image, re-speckled per
slice, and the sagittal and coronal planes through the lesion centre are cut
from that volume. The label is the 2-D image's benign/malignant label. Real
ABVS sagittal and coronal appearance (the coronal "retraction phenomenon",
the scanner's geometry) is not reproduced, and nothing here is validated on
ABVS data.

Usage::

    python -m models.training.train_abvs_three_plane --datasets ../shared/datasets --threads 1 --bf16
    python -m models.training.train_abvs_three_plane --stage export
    python -m models.training.train_abvs_three_plane --stage evaluate

Stages, resumable and recorded under ``--work`` (default ``runs/abvs_three_plane``):

``network``
    The training split's lesions become two volumes each; the validation
    split's one each (crops cached in ``planes_<split>.npz``). The three-plane
    network (:class:`models.families.abvs.network.ThreePlaneClassifier`, recipe
    in :mod:`models.families.abvs.recipe`) trains on random frames of them with
    consistent 3-D flips and gain/speckle augmentation, class-weighted
    cross-entropy, AdamW with warm-up and cosine decay; ``best.pt`` keeps the
    epoch with the best validation AUC of the served rule (three transverse
    frames averaged). The held-out test split is not read.
``export``
    The best epoch exported to ONNX (logits and in-graph Grad-CAM per plane),
    checked against PyTorch, its convolution weights stored as int8 when that
    moves no validation probability by 0.05 or more and the validation AUC by
    less than 0.005 (else fp16, else fp32), and merged into ``--output``'s
    manifest under the role ``abvs_three_plane``.
``evaluate``
    Once, after the export: the test split's volumes, built the same way,
    scored through the served file (:class:`models.inference.three_plane.ThreePlaneScorer`)
    beside the bundled 2-D consensus on the same lesions' central frames;
    writes ``models/cards/evaluation/abvs_three_plane.json`` and the card.
``card``
    The card again from that report and the manifest entry, scoring nothing
    (after the card's prose changed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnxconverter_common import float16
from torch.nn import functional

from models.datasets import SPLIT_RULE, Record, load_records, mask_box, read_gray
from models.errors import TrainingError
from models.evaluation.stats import auc, bootstrap_ci, delong_test, operating_point
from models.evaluation.three_plane import CARD_PATH, REPORT_PATH, three_plane_card
from models.families.abvs.network import EXPORT_INPUT_NAMES, EXPORT_OUTPUT_NAMES, ThreePlaneClassifier, frame_offsets
from models.families.abvs.recipe import RECIPE, ThreePlaneRecipe
from models.families.catalogue import card_texts
from models.families.onnx_export import int8_convolution_weights
from models.inference.backend import OnnxRuntimeBackend
from models.inference.findings import FamilyScore, ModelInfo
from models.inference.manifest import ConsensusSpec, ThreePlaneSpec
from models.inference.pipeline import load_scorer
from models.inference.registry import BUNDLED_MODEL_DIR, ModelEntry, merge_into_manifest, read_manifest, sha256_of
from models.inference.scorers import ClinicalContext, LesionView
from models.inference.three_plane import ThreePlaneScorer, load_three_plane_scorer
from models.training.abvs_volumes import plane_crops, record_volume
from models.training.export_family import int8_storage, serves_the_same
from models.training.export_reference import training_recipe
from models.training.loop import (
    DEVICES,
    Checkpoints,
    begin_run,
    epoch_batches,
    finished_run,
    optimise_step,
    scheduled_step,
    to_training_device,
    training_device,
)
from models.training.run_config import TrainConfig

METRIC = "val_auc"
#: Largest |logit| difference between the fp32 ONNX graph and PyTorch accepted at export.
EXPORT_TOLERANCE = 1e-3
#: The 2-D consensus the test figures are set beside.
CONSENSUS_ROLE = "consensus"

Uint8 = npt.NDArray[np.uint8]
Float32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ThreePlaneConfig(TrainConfig):
    """A three-plane run: the reference runs' settings plus the recipe's network and volumes."""

    backbone_depth: int = RECIPE.backbone_depth
    width: float = RECIPE.width
    train_volumes: int = RECIPE.train_volumes
    roi_expand: float = RECIPE.roi_expand


# Settings that make a different network: a run started under other values is not resumed under these.
DEFINING = (
    "seed",
    "batch_size",
    "learning_rate",
    "input_size",
    "backbone_depth",
    "width",
    "train_volumes",
    "roi_expand",
)


# --- crops -----------------------------------------------------------------------------------


def resized(crop: Uint8, size: int) -> Uint8:
    """``crop`` at ``size`` x ``size`` by the interpolation :func:`models.inference.preprocess.standardise` uses.

    z-scoring the result is exactly what the served scorer feeds the graph, so
    crops can be cached as uint8 and a cached crop passed to the scorer is
    resized to itself.
    """
    interpolation = cv2.INTER_AREA if min(crop.shape) >= size else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(crop, (size, size), interpolation=interpolation), dtype=np.uint8)


@dataclass(frozen=True)
class PlaneSet:
    """Resized uint8 crops of a split's lesions: (lesions, volumes, frames, size, size) per plane."""

    transverse: Uint8
    sagittal: Uint8
    coronal: Uint8
    labels: npt.NDArray[np.int64]
    ids: tuple[str, ...]


def lesion_planes(
    record: Record, seeds: Sequence[int], transverse: Sequence[int], side: Sequence[int], recipe: ThreePlaneRecipe
) -> tuple[Uint8, Uint8, Uint8] | None:
    """One lesion's resized crops: (volumes, frames, size, size) per plane, or None (no label or lesion).

    A frame where a plane misses the lesion (possible away from the centre)
    repeats that plane's central crop.
    """
    stacks: tuple[list[Uint8], list[Uint8], list[Uint8]] = ([], [], [])
    for seed in seeds:
        built = record_volume(record, seed, recipe.volume_depth, recipe.max_side)
        if built is None:
            return None
        volume, lesion, centre = built
        for plane, offsets, stack in zip((0, 1, 2), (transverse, side, side), stacks, strict=True):
            centre_crop = plane_crops(volume, lesion, centre, plane, [0], recipe.roi_expand)[0]
            frames = []
            for offset in offsets:
                found = plane_crops(volume, lesion, centre, plane, [offset], recipe.roi_expand)
                frames.append(resized(found[0] if found else centre_crop, recipe.input_size))
            stack.append(np.stack(frames))
    return np.stack(stacks[0]), np.stack(stacks[1]), np.stack(stacks[2])


def build_planes(
    records: Sequence[Record],
    seeds: Sequence[int],
    transverse: Sequence[int],
    side: Sequence[int],
    recipe: ThreePlaneRecipe,
) -> PlaneSet:
    """:func:`lesion_planes` of every labelled lesion of ``records``, in order."""
    planes: tuple[list[Uint8], list[Uint8], list[Uint8]] = ([], [], [])
    labels, ids = [], []
    for record in records:
        built = lesion_planes(record, seeds, transverse, side, recipe)
        if built is None:
            continue
        for stack, array in zip(planes, built, strict=True):
            stack.append(array)
        labels.append(int(record.malignant or 0))
        ids.append(f"{record.dataset}/{record.image_id}")
    if not labels:
        raise TrainingError("no labelled lesion with a mask to build volumes from")
    t, s, c = (np.stack(stack) for stack in planes)
    return PlaneSet(t, s, c, np.asarray(labels, dtype=np.int64), tuple(ids))


def split_records(datasets: Path, split: str) -> list[Record]:
    """The labelled ultrasound lesions with a mask of one split (BUS-BRA, BUSI, BrEaST)."""
    return [
        r for r in load_records(datasets) if r.split == split and r.malignant is not None and r.mask_path is not None
    ]


def cached_planes(work: Path, split: str, datasets: Path, recipe: ThreePlaneRecipe, seed: int) -> PlaneSet:
    """The split's :class:`PlaneSet`, built once and kept in ``work/planes_<split>.npz``.

    Training: ``recipe.train_volumes`` volumes per lesion and the training
    offsets; validation: one volume and the serving rule (``frames``
    transverse frames, sagittal and coronal through the centre). The cache
    is rebuilt when anything that made it differs.
    """
    if split == "train":
        seeds = [seed + k for k in range(recipe.train_volumes)]
        transverse = frame_offsets(recipe.train_transverse_frames, recipe.frame_step)
        side = frame_offsets(recipe.train_side_frames, recipe.frame_step)
    else:
        seeds, transverse, side = [seed], frame_offsets(recipe.frames, recipe.frame_step), [0]
    made = {
        "seeds": seeds,
        "transverse": transverse,
        "side": side,
        "size": recipe.input_size,
        "depth": recipe.volume_depth,
        "max_side": recipe.max_side,
        "roi_expand": recipe.roi_expand,
        "split_rule": SPLIT_RULE,
    }
    path = work / f"planes_{split}.npz"
    if path.is_file():
        with np.load(path) as cached:
            if json.loads(str(cached["made"])) == made:
                return PlaneSet(
                    cached["transverse"],
                    cached["sagittal"],
                    cached["coronal"],
                    cached["labels"],
                    tuple(str(i) for i in cached["ids"]),
                )
    began = time.monotonic()
    planes = build_planes(split_records(datasets, split), seeds, transverse, side, recipe)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        transverse=planes.transverse,
        sagittal=planes.sagittal,
        coronal=planes.coronal,
        labels=planes.labels,
        ids=np.asarray(planes.ids),
        made=np.asarray(json.dumps(made)),
    )
    print(
        json.dumps(
            {
                "built": split,
                "lesions": len(planes.labels),
                "volumes_per_lesion": len(seeds),
                "seconds": round(time.monotonic() - began, 1),
            }
        ),
        flush=True,
    )
    return planes


# --- batches ---------------------------------------------------------------------------------


def zscored(crops: npt.NDArray[Any]) -> Float32:
    """(B, S, S) crops -> (B, 1, S, S) float32, each z-scored on its own as :func:`standardise` does."""
    values = np.asarray(crops, dtype=np.float32)
    mean = values.mean(axis=(1, 2), keepdims=True)
    spread = values.std(axis=(1, 2), keepdims=True)
    result: Float32 = ((values - mean) / (spread + 1e-6)).astype(np.float32)[:, None]
    return result


def training_batch(
    planes: PlaneSet, index: npt.NDArray[np.int64], rng: np.random.Generator
) -> tuple[Float32, Float32, Float32]:
    """Augmented network inputs of the lesions at ``index``.

    Per lesion: one of its volumes, a random transverse, sagittal and coronal
    frame; flips that are mirror images of the whole volume (lateral: the
    transverse and coronal columns; sweep: the sagittal columns and coronal
    rows); one gain (gamma 0.7-1.4) for all three planes, as one scanner
    setting would give, and fresh multiplicative speckle per plane.
    """
    count = len(index)
    volume = rng.integers(planes.transverse.shape[1], size=count)
    t = planes.transverse[index, volume, rng.integers(planes.transverse.shape[2], size=count)].astype(np.float32)
    s = planes.sagittal[index, volume, rng.integers(planes.sagittal.shape[2], size=count)].astype(np.float32)
    c = planes.coronal[index, volume, rng.integers(planes.coronal.shape[2], size=count)].astype(np.float32)
    for k in range(count):
        if rng.random() < 0.5:  # lateral mirror
            t[k], c[k] = t[k][:, ::-1], c[k][:, ::-1]
        if rng.random() < 0.5:  # sweep mirror
            s[k], c[k] = s[k][:, ::-1], c[k][::-1, :]
    gamma = rng.uniform(0.7, 1.4, size=(count, 1, 1)).astype(np.float32)
    out = []
    for plane in (t, s, c):
        varied = (plane / 255.0) ** gamma * rng.normal(1.0, 0.05, plane.shape).astype(np.float32)
        out.append(zscored(np.clip(varied, 0.0, 1.0) * 255.0))
    return out[0], out[1], out[2]


@torch.no_grad()
def frame_probabilities(model: ThreePlaneClassifier, planes: PlaneSet, chunk: int = 32) -> npt.NDArray[np.float64]:
    """(lesions, frames) malignancy probabilities of the served rule: each transverse frame with the central
    sagittal and coronal crop, in fp32 as exported.
    """
    model.eval()
    lesions, frames = planes.transverse.shape[0], planes.transverse.shape[2]
    results = []
    for start in range(0, lesions, chunk):
        stop = min(lesions, start + chunk)
        t = zscored(planes.transverse[start:stop, 0].reshape(-1, *planes.transverse.shape[-2:]))
        s = np.repeat(zscored(planes.sagittal[start:stop, 0, 0]), frames, axis=0)
        c = np.repeat(zscored(planes.coronal[start:stop, 0, 0]), frames, axis=0)
        logits = model(torch.from_numpy(t), torch.from_numpy(s), torch.from_numpy(c)).double()
        results.append(torch.softmax(logits, dim=1)[:, 1].numpy().reshape(stop - start, frames))
    return np.concatenate(results)


def served_rule(frame_probs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each lesion's probability: the mean of its frames' (the paper's test-time rule)."""
    mean: npt.NDArray[np.float64] = frame_probs.mean(axis=1)
    return mean


def new_network(recipe: ThreePlaneRecipe = RECIPE) -> ThreePlaneClassifier:
    return ThreePlaneClassifier(backbone_depth=recipe.backbone_depth, in_channels=1, width=recipe.width)


def train_network(config: ThreePlaneConfig, recipe: ThreePlaneRecipe = RECIPE) -> None:
    """Class-weighted cross-entropy on augmented frames; AdamW, warm-up and cosine decay; ``best.pt`` by validation
    AUC of the served rule.
    """
    work, datasets = Path(config.work), Path(config.datasets)
    train = cached_planes(work, "train", datasets, recipe, config.seed)
    val = cached_planes(work, "val", datasets, recipe, config.seed)
    if len(set(val.labels.tolist())) < 2:
        raise TrainingError("the validation split needs benign and malignant lesions to choose an epoch")
    device = training_device(config.device)
    model = to_training_device(new_network(recipe), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=recipe.weight_decay)
    # Balanced classes: each class weighs as much as the other in the loss, whatever its share of lesions.
    counts = np.bincount(train.labels, minlength=2).astype(np.float64)
    weights = torch.tensor(counts.sum() / (2.0 * np.maximum(counts, 1.0)), dtype=torch.float32, device=device)
    checkpoints = Checkpoints(work)
    start, best = checkpoints.resume(model, optimizer)
    rng = np.random.default_rng(config.seed + start)
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        losses = []
        batches = epoch_batches(rng, len(train.labels), config.batch_size)
        for step, index in enumerate(batches):
            t, s, c = (torch.from_numpy(x).to(device) for x in training_batch(train, index, rng))
            labels = torch.from_numpy(train.labels[index]).to(device)
            with scheduled_step(optimizer, config, device, (epoch, step, len(batches))):
                logits = model(t, s, c)
            losses.append(optimise_step(optimizer, functional.cross_entropy(logits.float(), labels, weight=weights)))
        model.cpu()
        frame_probs = frame_probabilities(model, val)
        model.to(device)
        score = auc(val.labels, served_rule(frame_probs))
        checkpoints.log(
            {"part": config.part, "epoch": epoch, "val_auc_central_frame": auc(val.labels, frame_probs[:, 0])}
        )
        best, stop = checkpoints.end_epoch(model, optimizer, epoch, losses, METRIC, score, best, began, config)
        if stop:
            break


# --- export ----------------------------------------------------------------------------------


def served_probabilities(path: Path, planes: PlaneSet, spec: ThreePlaneSpec) -> list[float]:
    """Each lesion's probability through the served scorer over the graph at ``path`` (cached crops, resized to
    themselves).
    """
    scorer = ThreePlaneScorer(OnnxRuntimeBackend(path), spec, ModelInfo("candidate", "", ""))
    frames = planes.transverse.shape[2]
    return [
        scorer.score(
            [planes.transverse[i, 0, f] for f in range(frames)], planes.sagittal[i, 0, 0], planes.coronal[i, 0, 0]
        )
        for i in range(len(planes.labels))
    ]


def entry_parameters(recipe: ThreePlaneRecipe) -> dict[str, Any]:
    """The serving fields of the manifest entry (:class:`models.inference.manifest.ThreePlaneSpec`)."""
    return {
        "input_size": recipe.input_size,
        "roi_expand": recipe.roi_expand,
        "inputs": list(EXPORT_INPUT_NAMES),
        "outputs": list(EXPORT_OUTPUT_NAMES),
        "operating_point": recipe.operating_point,
        "frames": recipe.frames,
        "frame_step": recipe.frame_step,
    }


def export_model(work: Path, out: Path, datasets: Path, recipe: ThreePlaneRecipe = RECIPE) -> ModelEntry:
    """Export ``work/best.pt`` into ``out`` (``abvs_three_plane.onnx``) and merge its entry into the manifest there.

    Raises
    ------
    TrainingError
        The run has no checkpoint, or the fp32 graph differs from PyTorch beyond :data:`EXPORT_TOLERANCE`.
    """
    import onnxruntime as ort

    from models.families.abvs.network import export_onnx
    from models.inference.manifest import parse_spec

    run = finished_run(work)
    state, config, last, log = run.best, run.config, run.last, run.log
    model = new_network(recipe)
    model.load_state_dict(state["model"])
    model.eval()
    val = cached_planes(work, "val", datasets, recipe, int(config["seed"]))
    labels = val.labels.tolist()
    spec = parse_spec(recipe.role, entry_parameters(recipe))
    assert isinstance(spec, ThreePlaneSpec)
    out.mkdir(parents=True, exist_ok=True)
    destination = out / f"{recipe.role}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", recipe.input_size)
        session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        probe = 32
        t = zscored(val.transverse[:probe, 0, 0])
        s = zscored(val.sagittal[:probe, 0, 0])
        c = zscored(val.coronal[:probe, 0, 0])
        with torch.no_grad():
            reference = model(torch.from_numpy(t), torch.from_numpy(s), torch.from_numpy(c)).numpy()
        got = session.run(["logits"], dict(zip(EXPORT_INPUT_NAMES, (t, s, c), strict=True)))[0]
        worst = float(np.abs(got - reference).max())
        if worst > EXPORT_TOLERANCE:
            raise TrainingError(f"the exported graph differs from PyTorch by {worst} (tolerance {EXPORT_TOLERANCE})")
        as_float = served_probabilities(fp32, val, spec)
        compressed, count = int8_convolution_weights(onnx.load(str(fp32)))
        int8 = Path(tmp) / "int8.onnx"
        onnx.save(compressed, str(int8))
        storage = int8_storage(count, labels, as_float, served_probabilities(int8, val, spec), "the float32 graph")
        chosen, precision = fp32, "float32"
        if storage["accepted"]:
            chosen = int8
        else:
            print(f"int8 weights change what is served too much ({storage}); trying fp16", flush=True)
            half = Path(tmp) / "fp16.onnx"
            onnx.save(float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=False), str(half))
            if serves_the_same(labels, as_float, served_probabilities(half, val, spec)):
                chosen, precision = half, "float16"
        shutil.copyfile(chosen, destination)
    served_val = served_probabilities(destination, val, spec)
    epoch_entry: dict[str, Any] = next(
        (e for e in log if e.get("epoch") == state["epoch"] and "val_auc_central_frame" in e), {}
    )
    minutes = max((float(e["minutes"]) for e in log if "minutes" in e), default=float("nan"))
    train_lesions = len(split_records(datasets, "train"))
    entry = ModelEntry(
        role=recipe.role,
        name=recipe.model_name,
        version=recipe.version,
        file=destination.name,
        sha256=sha256_of(destination),
        parameters={
            **entry_parameters(recipe),
            "precision": precision,
            "task": "malignancy",
            "modality": "US",
            "weight_storage": storage,
            "max_abs_logit_diff_fp32": worst,
            "network": {
                "trunks": f"ResNet-{recipe.backbone_depth} per plane at width {recipe.width} (channels 32-256)",
                "fusion": "gap(transverse) + gap(sagittal), concatenated with gap(coronal); FC to half; ReLU; FC to 2",
                "parameters": int(sum(p.numel() for p in model.parameters())),
            },
            "volumes": {
                "construction": "models.training.abvs_volumes.build_volume: synthetic, built from one 2-D B-mode "
                "image and its lesion mask each; not ABVS data",
                "slices": recipe.volume_depth,
                "max_side": recipe.max_side,
                "train_volumes_per_lesion": recipe.train_volumes,
            },
            "training": {
                **training_recipe(config, int(last["epoch"]) + 1),
                "datasets": ["busbra", "busi", "breast_lesions"],
                "input_size": config["input_size"],
                "weight_decay": recipe.weight_decay,
                "best_epoch": int(state["epoch"]),
                "val_auc": round(float(state["score"]), 4),
                "val_auc_central_frame": round(float(epoch_entry.get("val_auc_central_frame", float("nan"))), 4),
                "val_auc_as_served": round(auc(labels, served_val), 4),
                "minutes": round(minutes, 1),
                "threads": config["threads"],
                "lesions": {"train": train_lesions, "val": len(labels)},
                "initialisation": "random (from scratch; no pretrained weights available)",
                "split": f"the project's split ({SPLIT_RULE}); test held out, validation chose the epoch",
            },
        },
    )
    merge_into_manifest(out, {recipe.role: entry})
    return entry


# --- held-out evaluation ---------------------------------------------------------------------


def _scaled_spacing(record: Record, volume_columns: int) -> float | None:
    """The record's pixel spacing at the volume's (shrunk) scale, or None when it has none."""
    if record.pixel_spacing_mm is None:
        return None
    columns = int(read_gray(record.image_path).shape[1])
    return float(record.pixel_spacing_mm) * columns / volume_columns


def _figures(
    labels: Sequence[int], scores: Sequence[float], clusters: Sequence[str], threshold: float, resamples: int
) -> dict[str, Any]:
    low, high = bootstrap_ci(labels, scores, resamples=resamples, clusters=clusters)
    point = operating_point(labels, scores, threshold)
    return {
        "n": len(labels),
        "n_positive": int(sum(labels)),
        "auc": auc(labels, scores),
        "auc_ci": [low, high],
        "threshold": threshold,
        "sensitivity": point.sensitivity,
        "specificity": point.specificity,
    }


def evaluate_test(
    model_dir: Path, datasets: Path, recipe: ThreePlaneRecipe = RECIPE, resamples: int = 1000
) -> dict[str, Any]:
    """The served model on the test split's synthetic volumes, beside the 2-D consensus on their central frames.

    The central transverse frame of each volume is the real 2-D image shrunk
    to ``recipe.max_side``; the consensus scores it with the lesion's mask box
    (the largest component, as ``breastai evaluate`` does). AUC intervals:
    percentile bootstrap over patients; DeLong (clustered) for the paired
    difference.

    Raises
    ------
    TrainingError
        The folder has no ``abvs_three_plane`` entry.
    """
    scorer = load_three_plane_scorer(model_dir)
    if scorer is None:
        raise TrainingError(f"{model_dir} lists no {recipe.role}: export it first (--stage export)")
    entries = read_manifest(model_dir)
    consensus_entry = entries.get(CONSENSUS_ROLE)
    members: dict[str, Any] = {}
    consensus = None
    if consensus_entry is not None:
        consensus = load_scorer(consensus_entry, entries, model_dir)
        members = {
            role: load_scorer(entries[role], entries, model_dir)
            for role in consensus_entry.spec_as(ConsensusSpec).members
        }
    spec = scorer.spec
    transverse_offsets = frame_offsets(spec.frames, spec.frame_step)
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    for record in split_records(datasets, "test"):
        built = record_volume(record, recipe.seed, recipe.volume_depth, recipe.max_side)
        if built is None:
            continue
        volume, lesion, centre = built
        transverse = plane_crops(volume, lesion, centre, 0, transverse_offsets, spec.roi_expand)
        sagittal = plane_crops(volume, lesion, centre, 1, [0], spec.roi_expand)[0]
        coronal = plane_crops(volume, lesion, centre, 2, [0], spec.roi_expand)[0]
        row: dict[str, Any] = {
            "id": f"{record.dataset}/{record.image_id}",
            "dataset": record.dataset,
            "patient": record.patient,
            "label": int(record.malignant or 0),
            "three_plane": scorer.score(transverse, sagittal, coronal),
            "central_frame_only": float(scorer.frame_probabilities(transverse[:1], sagittal, coronal)[0]),
        }
        if consensus is not None:
            central = np.ascontiguousarray(volume[centre[0]])
            box = mask_box(np.ascontiguousarray(lesion[centre[0]]))
            assert box is not None  # the centre is a lesion voxel of this slice
            context = ClinicalContext(record.age_years, _scaled_spacing(record, int(central.shape[1])))
            view = LesionView(central, box, None, context)
            scored: dict[str, FamilyScore] = {role: member.score_lesion(view, {}) for role, member in members.items()}
            row["consensus_central_frame"] = consensus.score_lesion(view, scored).probability
        rows.append(row)
    labels = [row["label"] for row in rows]
    clusters = [row["patient"] for row in rows]
    threshold = spec.operating_point
    three = [row["three_plane"] for row in rows]
    report: dict[str, Any] = {
        "model": {
            "name": scorer.model_info.name,
            "version": scorer.model_info.version,
            "sha256": scorer.model_info.sha256,
        },
        "split": "test",
        "data": "synthetic volumes built from the test split's 2-D lesions (models.training.abvs_volumes); not ABVS",
        "seconds": round(time.monotonic() - began, 1),
        "resamples": resamples,
        "resampled": "patients, each patient's images drawn together",
        "three_plane": _figures(labels, three, clusters, threshold, resamples),
        "three_plane_central_frame_only": _figures(
            labels, [row["central_frame_only"] for row in rows], clusters, threshold, resamples
        ),
        "by_dataset": {},
    }
    for name in sorted({row["dataset"] for row in rows}):
        subset = [row for row in rows if row["dataset"] == name]
        sub_labels = [row["label"] for row in subset]
        if len(set(sub_labels)) == 2:
            report["by_dataset"][name] = _figures(
                sub_labels,
                [row["three_plane"] for row in subset],
                [row["patient"] for row in subset],
                threshold,
                resamples,
            )
    if consensus is not None and consensus_entry is not None:
        theirs = [row["consensus_central_frame"] for row in rows]
        report["consensus_central_frame"] = {
            **_figures(labels, theirs, clusters, consensus.threshold, resamples),
            "model": {
                "name": consensus_entry.name,
                "version": consensus_entry.version,
                "sha256": consensus_entry.sha256,
            },
        }
        test = delong_test(labels, three, theirs, clusters)
        low, high = test.difference_ci()
        report["difference_three_plane_minus_consensus"] = {
            "auc_difference": test.difference,
            "ci": [low, high],
            "p_value": test.p_value,
            "test": "DeLong with Obuchowski's clustered covariance (patients)",
        }
    return report


def write_report_and_card(report: dict[str, Any], model_dir: Path, root: Path) -> tuple[Path, Path]:
    """``models/cards/evaluation/abvs_three_plane.json`` and the card, under ``root`` (the repository)."""
    entry = read_manifest(model_dir)[RECIPE.role]
    report_path, card_path = root / REPORT_PATH, root / CARD_PATH
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    card_path.write_text(three_plane_card(entry, report, card_texts().get(RECIPE.role, {})))
    return report_path, card_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work", default="runs/abvs_three_plane", help="checkpoint folder")
    parser.add_argument("--output", default=str(BUNDLED_MODEL_DIR), help="model folder the export merges into")
    parser.add_argument(
        "--stage",
        choices=("network", "export", "evaluate", "card", "all"),
        default="all",
        help="card: rewrite the card from the committed held-out report, scoring nothing",
    )
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs)
    parser.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    parser.add_argument("--learning-rate", type=float, default=RECIPE.learning_rate)
    parser.add_argument("--seed", type=int, default=RECIPE.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument(
        "--max-minutes", type=float, default=float("inf"), help="stop after the epoch that crosses this"
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPUs with AVX512-BF16 or AMX)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the test figures")
    args = parser.parse_args(argv)
    config = ThreePlaneConfig(
        part=RECIPE.role,
        datasets=args.datasets,
        work=args.work,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        input_size=RECIPE.input_size,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        device=args.device,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    if args.stage in ("network", "all"):
        begin_run(config, DEFINING)
        train_network(config)
    if args.stage in ("export", "all"):
        entry = export_model(Path(args.work), Path(args.output), Path(args.datasets))
        print(json.dumps({"exported": entry.file, "sha256": entry.sha256, "training": entry.parameters["training"]}))
    if args.stage in ("evaluate", "all"):
        report = evaluate_test(Path(args.output), Path(args.datasets), resamples=args.resamples)
        paths = write_report_and_card(report, Path(args.output), Path(__file__).resolve().parents[2])
        print(json.dumps({"written": [str(p) for p in paths], "three_plane": report["three_plane"]}))
    if args.stage == "card":
        root = Path(__file__).resolve().parents[2]
        paths = write_report_and_card(json.loads((root / REPORT_PATH).read_text()), Path(args.output), root)
        print(json.dumps({"written": [str(p) for p in paths]}))


if __name__ == "__main__":
    main()
