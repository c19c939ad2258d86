"""Train and export the mammography lesion finder on mini-MIAS (``make train-mg_finder``).

Usage::

    python -m models.training.train_mg_finder --datasets ../shared/datasets --threads 2 --bf16
    python -m models.training.train_mg_finder --stage export

Stages, resumable and recorded under ``--work`` (default ``runs/mg_finder``):

``network``
    The heat-map network (:mod:`models.families.mg_finder`) on 256 px crops of
    the training split's images, each image oriented with the chest wall on
    the left and standardised whole before it is cut; one JSON log line per
    epoch. Each epoch ends with the network run through the serving code
    (:class:`models.inference.mammography.MammogramFinder`) on the validation
    split's whole images, and ``best.pt`` keeps the epoch with the best mean
    FROC sensitivity at 0.5, 1 and 2 false positives per image there. The
    held-out test split is never read.
``export``
    Batch-norm statistics recomputed on whole training images (as serving
    sees them), the graph exported in fp32 with free height and width into
    ``--output``, checked against PyTorch at two sizes, and merged into its
    manifest under the role ``mg_finder`` with the serving rules and the
    training record. ``breastai evaluate`` (or ``python -m
    models.evaluation.finder``) measures it on the test split and writes its card.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.datasets import MIAS_MM_PER_PIXEL, MiasCase, mias_cases, read_gray
from models.errors import TrainingError
from models.evaluation.finder import find_all, froc_score, image_auc
from models.families.mg_finder.network import FinderExportWrapper, mammogram_finder_network
from models.families.mg_finder.recipe import RECIPE, FinderRecipe, target_disks
from models.families.onnx_export import export_graph
from models.families.segmentation.network import recalibrate_batch_norm
from models.inference.backend import Arrays, OnnxRuntimeBackend
from models.inference.findings import ModelInfo
from models.inference.mammography import (
    TISSUE_LEVEL,
    MammogramFinder,
    chest_wall_on_left,
    padded_to_multiple,
    resample,
    standardise_mammogram,
    working_shape,
)
from models.inference.manifest import MammogramFinderSpec, ModelKind
from models.inference.registry import BUNDLED_MODEL_DIR, ModelEntry, merge_into_manifest, sha256_of
from models.training.export_reference import training_recipe
from models.training.loop import (
    DEVICES,
    Checkpoints,
    augment_geometry,
    augment_intensity,
    bce_soft_dice,
    begin_run,
    device_of,
    finished_run,
    mixed_precision,
    optimise_step,
    scheduled_step,
    to_training_device,
    training_device,
)
from models.training.run_config import TrainConfig
from models.training.train_reference import without_zero_width_padding

METRIC = "val_froc_score"
#: Largest |logit| difference between ONNX Runtime and PyTorch accepted at export.
EXPORT_TOLERANCE = 1e-3
#: Whole training images the batch-norm statistics are recomputed on during validation (all of them at export).
CALIBRATION_IMAGES_PER_EPOCH = 32


@dataclass(frozen=True)
class FinderConfig(TrainConfig):
    """A finder run: the reference runs' settings plus the recipe's crop sampling."""

    crops_per_epoch: int = RECIPE.crops_per_epoch


# Settings that make a different network: a run started under other values is not resumed under these.
FINDER_DEFINING = ("seed", "batch_size", "learning_rate", "input_size", "crops_per_epoch")


@dataclass(frozen=True)
class OrientedImage:
    """One image at the working resolution, chest wall on the left, with its target disks (same orientation)."""

    case: MiasCase
    gray: npt.NDArray[np.uint8]
    target: npt.NDArray[np.uint8]


def oriented_image(case: MiasCase, recipe: FinderRecipe = RECIPE) -> OrientedImage:
    """Read one mini-MIAS image as the network sees it: resampled (a no-op at 0.4 mm), mirrored by the serving
    heuristic where its chest wall is on the right, and its target mirrored with it.
    """
    stored = read_gray(case.image_path)
    shape = (int(stored.shape[0]), int(stored.shape[1]))
    working = resample(stored, working_shape(shape, MIAS_MM_PER_PIXEL, recipe.mm_per_pixel))
    scale = working.shape[1] / shape[1]
    listed = [
        replace(f, centre_xy=(f.centre_xy[0] * scale, f.centre_xy[1] * scale), radius_px=f.radius_px * scale)
        for f in case.findings
    ]
    target = target_disks((int(working.shape[0]), int(working.shape[1])), listed, recipe.min_target_radius_px)
    if not chest_wall_on_left(working):
        working, target = working[:, ::-1], target[:, ::-1]
    return OrientedImage(case, np.ascontiguousarray(working), np.ascontiguousarray(target))


def training_images(cases: Sequence[MiasCase], split: str) -> list[MiasCase]:
    """The cases of ``split`` that can be drawn as targets: an abnormality without a centre has no disk to draw."""
    return [case for case in cases if case.split == split and case.unlocated == 0]


def augmented(image: OrientedImage, rng: np.random.Generator) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The whole image and target with the loop's geometric and intensity augmentation, the chest wall kept left.

    :func:`models.training.loop.augment_geometry` flips left-right; applied to
    the transposed image its flip becomes an up-down one (rotation, scale and
    shift are drawn symmetrically, so transposing changes nothing else).
    """
    gray, target = augment_geometry(np.ascontiguousarray(image.gray.T), np.ascontiguousarray(image.target.T), rng)
    assert target is not None
    return augment_intensity(np.ascontiguousarray(gray.T), rng), np.ascontiguousarray(target.T)


def crop_pair(
    gray: npt.NDArray[np.uint8],
    target: npt.NDArray[np.uint8],
    near_abnormality: bool,
    size: int,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """One training crop of the whole image standardised as serving does, and its target.

    The crop is centred within a quarter crop of a target pixel
    (``near_abnormality``, where the augmented image still shows one), else
    on a random tissue pixel (anywhere where there is none). The image is
    padded with black first, so that crops near an edge see background, as
    serving's padding does.
    """
    half = size // 2
    padded_gray = np.pad(gray, half)
    padded_target = np.pad(target, half)
    standardised = standardise_mammogram(padded_gray)
    candidates = np.flatnonzero(target) if near_abnormality and target.any() else np.flatnonzero(gray >= TISSUE_LEVEL)
    if candidates.size == 0:
        candidates = np.arange(gray.size)
    picked_row, picked_column = np.unravel_index(int(rng.choice(candidates)), gray.shape)
    shift = rng.integers(-size // 4, size // 4 + 1, 2) if near_abnormality else np.zeros(2, dtype=np.int64)
    row = int(np.clip(int(picked_row) + int(shift[0]), 0, gray.shape[0] - 1)) + half
    column = int(np.clip(int(picked_column) + int(shift[1]), 0, gray.shape[1] - 1)) + half
    window = (slice(row - half, row - half + size), slice(column - half, column - half + size))
    return standardised[window], padded_target[window].astype(np.float32)


class TorchBackend:
    """A :class:`models.inference.backend.Backend` over the network being trained, so validation runs the serving code.

    Runs in evaluation mode without gradients, in the training device's
    arithmetic (``bf16``: bfloat16 autocast, as the run trains).
    """

    def __init__(self, network: nn.Module, bf16: bool) -> None:
        self._network = network
        self._bf16 = bf16

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits",)

    @torch.no_grad()
    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        device = device_of(self._network)
        with mixed_precision(device, self._bf16):
            logits = self._network(torch.from_numpy(np.ascontiguousarray(inputs["image"])).to(device))
        return {"logits": logits.float().cpu().numpy()}


def whole_inputs(images: Sequence[OrientedImage], multiple: int) -> Iterator[torch.Tensor]:
    """Whole images as serving feeds them (padded, standardised), one batch each (their sizes may differ)."""
    for image in images:
        yield torch.from_numpy(standardise_mammogram(padded_to_multiple(image.gray, multiple))[None, None])


def served_spec(recipe: FinderRecipe, role: str | None = None) -> MammogramFinderSpec:
    """The serving rules of ``recipe`` as the manifest entry will hold them."""
    return MammogramFinderSpec(
        role=role or recipe.role,
        kind=ModelKind.MG_FINDER,
        mm_per_pixel=recipe.mm_per_pixel,
        threshold=recipe.threshold,
        min_area_mm2=recipe.min_area_mm2,
        max_findings=recipe.max_findings,
        side_multiple=recipe.side_multiple,
    )


@torch.no_grad()
def validate(
    model: nn.Module,
    calibration: Sequence[OrientedImage],
    val: Sequence[MiasCase],
    recipe: FinderRecipe,
    bf16: bool,
) -> tuple[float, float]:
    """(mean FROC sensitivity, image-level AUC) on the validation images, through the serving code.

    A copy of the network gets batch-norm statistics recomputed on whole
    training images, as the export does, so the score is the exported model's.
    """
    network = copy.deepcopy(model)
    recalibrate_batch_norm(network, whole_inputs(calibration, recipe.side_multiple))
    network.eval()
    finder = MammogramFinder(TorchBackend(network, bf16), served_spec(recipe), ModelInfo("validation", "", ""))
    images = find_all(finder, val)
    return froc_score(images), image_auc(images)


def train_network(config: FinderConfig, recipe: FinderRecipe = RECIPE) -> None:
    """BCE + soft Dice on augmented crops; AdamW, warm-up and cosine decay; ``best.pt`` by validation FROC score."""
    cases = mias_cases(Path(config.datasets))
    train = [oriented_image(case, recipe) for case in training_images(cases, "train")]
    val = [case for case in cases if case.split == "val"]
    if not train or not val:
        raise TrainingError(f"mini-MIAS under {config.datasets} has no training or no validation image")
    abnormal = [index for index, image in enumerate(train) if image.target.any()]
    if not abnormal:
        raise TrainingError(f"mini-MIAS under {config.datasets} has no training image with a located abnormality")
    calibration_step = max(1, len(train) // CALIBRATION_IMAGES_PER_EPOCH)
    device = training_device(config.device)
    model = to_training_device(without_zero_width_padding(mammogram_finder_network(), config.input_size), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    checkpoints = Checkpoints(Path(config.work))
    start, best = checkpoints.resume(model, optimizer)
    rng = np.random.default_rng(config.seed + start)
    steps_per_epoch = max(1, config.crops_per_epoch // config.batch_size)
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        losses = []
        for step in range(steps_per_epoch):
            xs, ys = [], []
            for _ in range(config.batch_size):
                near = bool(rng.random() < recipe.abnormality_crop_share)
                index = int(rng.choice(abnormal)) if near else int(rng.integers(len(train)))
                x, y = crop_pair(*augmented(train[index], rng), near, config.input_size, rng)
                xs.append(x[None])
                ys.append(y[None])
            x_batch = torch.from_numpy(np.stack(xs)).to(device)
            y_batch = torch.from_numpy(np.stack(ys)).to(device)
            with scheduled_step(optimizer, config, device, (epoch, step, steps_per_epoch)):
                logits = model(x_batch)
            losses.append(optimise_step(optimizer, bce_soft_dice(logits.float(), y_batch)))
        score, val_auc = validate(model, train[::calibration_step], val, recipe, config.bf16)
        checkpoints.log({"part": config.part, "epoch": epoch, "val_image_auc": val_auc})
        best, stop = checkpoints.end_epoch(model, optimizer, epoch, losses, METRIC, score, best, began, config)
        if stop:
            break


def export_finder(work: Path, out: Path, datasets: Path, recipe: FinderRecipe = RECIPE) -> ModelEntry:
    """Export ``work/best.pt`` into ``out`` (``mg_finder.onnx``) and merge its entry into the manifest there.

    Raises
    ------
    TrainingError
        The run has no checkpoint, or the exported graph differs from PyTorch beyond :data:`EXPORT_TOLERANCE`.
    """
    import onnxruntime as ort

    run = finished_run(work)
    state, config, last, log = run.best, run.config, run.last, run.log
    model = without_zero_width_padding(mammogram_finder_network(), recipe.side_multiple)
    model.load_state_dict(state["model"])
    cases = mias_cases(datasets)
    train = [oriented_image(case, recipe) for case in training_images(cases, "train")]
    val = [case for case in cases if case.split == "val"]
    recalibrate_batch_norm(model, whole_inputs(train, recipe.side_multiple))
    model.eval()
    wrapper = FinderExportWrapper(model).eval()
    destination = out / f"{recipe.role}.onnx"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "finder.onnx"
        export_graph(wrapper, (torch.zeros(1, 1, 512, 512),), graph, ["image"], ["logits"], dynamic_sides=True)
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        worst = 0.0
        # Two sizes: a mini-MIAS image, and a non-square one as a resampled detector image gives.
        for image, shape in ((oriented_image(val[0], recipe), None), (oriented_image(val[1], recipe), (608, 752))):
            gray = image.gray if shape is None else resample(image.gray, shape)
            probe = standardise_mammogram(padded_to_multiple(gray, recipe.side_multiple))[None, None]
            with torch.no_grad():
                reference = wrapper(torch.from_numpy(probe)).numpy()
            got = session.run(["logits"], {"image": probe})[0]
            worst = max(worst, float(np.abs(got - reference).max()))
        if worst > EXPORT_TOLERANCE:
            raise TrainingError(f"the exported finder differs from PyTorch by {worst} (tolerance {EXPORT_TOLERANCE})")
        destination.write_bytes(graph.read_bytes())
    # The validation figures of the file as served (fp32, ONNX Runtime, every training image in the batch-norm
    # statistics), beside the ones the run logged when it chose the epoch.
    served = MammogramFinder(
        OnnxRuntimeBackend(destination), served_spec(recipe), ModelInfo(recipe.model_name, recipe.version, "")
    )
    served_val = find_all(served, val)
    validation: dict[str, Any] = next((e for e in log if e.get("epoch") == state["epoch"] and "val_image_auc" in e), {})
    minutes = max((float(e["minutes"]) for e in log if "minutes" in e), default=float("nan"))
    counts = {
        split: {
            "images": sum(c.split == split for c in cases),
            "abnormal": sum(c.split == split and c.abnormal for c in cases),
            "listed": sum(len(c.findings) for c in cases if c.split == split),
        }
        for split in ("train", "val", "test")
    }
    entry = ModelEntry(
        role=recipe.role,
        name=recipe.model_name,
        version=recipe.version,
        file=destination.name,
        sha256=sha256_of(destination),
        parameters={
            "precision": "float32",
            "mm_per_pixel": recipe.mm_per_pixel,
            "threshold": recipe.threshold,
            "min_area_mm2": recipe.min_area_mm2,
            "max_findings": recipe.max_findings,
            "side_multiple": recipe.side_multiple,
            "inputs": ["image"],
            "outputs": ["logits"],
            "modality": "MG",
            "max_abs_logit_diff_fp32": worst,
            "training": {
                **training_recipe(config, int(last["epoch"]) + 1),
                "datasets": ["mias"],
                "crop_px": config["input_size"],
                "crops_per_epoch": config["crops_per_epoch"],
                "best_epoch": int(state["epoch"]),
                "val_froc_score": round(float(state["score"]), 4),
                "val_image_auc": round(float(validation.get("val_image_auc", float("nan"))), 4),
                "val_froc_score_as_served": round(froc_score(served_val), 4),
                "val_image_auc_as_served": round(image_auc(served_val), 4),
                "minutes": round(minutes, 1),
                "threads": config["threads"],
                "cases": counts,
                "initialisation": "random (from scratch; no pretrained weights available)",
                "split": "mini-MIAS by woman: 20 % test (held out), 10 % validation (checkpoint), the rest training",
            },
        },
    )
    merge_into_manifest(out, {recipe.role: entry})
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work", default="runs/mg_finder", help="checkpoint folder")
    parser.add_argument("--output", default=str(BUNDLED_MODEL_DIR), help="model folder the export merges into")
    parser.add_argument("--stage", choices=("network", "export", "all"), default="all")
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs)
    parser.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    parser.add_argument("--learning-rate", type=float, default=RECIPE.learning_rate)
    parser.add_argument("--crop", type=int, default=RECIPE.crop_px, help="training crop side, pixels at 0.4 mm")
    parser.add_argument("--crops-per-epoch", type=int, default=RECIPE.crops_per_epoch)
    parser.add_argument("--seed", type=int, default=RECIPE.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument(
        "--max-minutes", type=float, default=float("inf"), help="stop after the epoch that crosses this"
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPUs with AVX512-BF16 or AMX)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    args = parser.parse_args(argv)
    if args.crop % RECIPE.side_multiple:
        raise TrainingError(f"--crop must be a multiple of {RECIPE.side_multiple}, not {args.crop}")
    config = FinderConfig(
        part=RECIPE.role,
        datasets=args.datasets,
        work=args.work,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        input_size=args.crop,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        device=args.device,
        crops_per_epoch=args.crops_per_epoch,
    )
    if args.stage in ("network", "all"):
        begin_run(config, FINDER_DEFINING)
        train_network(config)
    if args.stage in ("export", "all"):
        if args.threads:
            torch.set_num_threads(args.threads)
        entry = export_finder(Path(args.work), Path(args.output), Path(args.datasets))
        print(json.dumps({"exported": entry.file, "sha256": entry.sha256, "training": entry.parameters["training"]}))


if __name__ == "__main__":
    main()
