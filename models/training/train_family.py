"""Train one paper family on the development datasets (``breastai train FAMILY``).

Usage::

    python -m models.training.train_family dlr_lh --datasets ../shared/datasets
    python -m models.training.train_family cldlr --stage finish

Stages, each resumable and recorded under ``--work`` (default
``runs/families/FAMILY``):

``network``
    The family's convolutional network on lesion ROIs cut around the
    ground-truth mask's largest region (the papers crop from segmentation
    masks), jittered as a segmenter's box would vary; seeded; one JSON log
    line per epoch; ``best.pt`` by validation AUC.
``finish``
    What the paper adds after the network: DLR's age MLP, CLDLR's SVMs
    (clinical / DLR / CLDLR), MUP-Net's prototype projection and last-layer
    training.
``export``
    ONNX (fp16 where the outputs hold within tolerance of PyTorch) into
    ``--output`` with a manifest entry; evaluation and the model card are
    ``breastai evaluate``'s job.

Split: :mod:`models.training.data` (BUS-BRA by patient fold, others by a
stable image hash). No pretrained weights exist here: every network starts
from scratch, as its card says.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional

from models.evaluation.stats import auc
from models.families.cldlr import network as cldlr
from models.families.dlr import network as dlr
from models.families.dlum import network as dlum
from models.families.mupnet import network as mupnet
from models.families.ensemble import ENSEMBLE_FAMILIES
from models.inference.preprocess import (
    Box,
    crop,
    expand_box,
    expand_box_by_shortest_side,
    min_max,
    square_box,
    standardise,
)
from models.training.data import (
    US_DATASETS,
    Record,
    birads_high,
    load_records,
    mask_box,
    mias_findings,
    read_gray,
    read_mask,
)
from models.training.loop import (
    DEVICES,
    Checkpoints,
    augment_contrast_and_blur,
    augment_intensity,
    check_resumable,
    cosine_lr,
    device_of,
    mixed_precision,
    optimise_step,
    rotated_crop,
    seed_everything,
    to_training_device,
    training_device,
)
from models.training.train_reference import DEFAULT_SEED, TrainConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class LesionSample:
    """One lesion: the full grayscale image, its ground-truth box, its label and where it came from."""

    record: Record
    image: npt.NDArray[np.uint8]
    box: Box
    label: int


# --------------------------------------------------------------------------- ROI preparation


AUGMENTATIONS = ("standard", "strong")


@dataclass(frozen=True)
class RoiStyle:
    """How a family cuts and normalises its ROI: the papers differ."""

    normalisation: str  # "zscore" (per-ROI standardisation) or "minmax" (DL-UM: [0, 1])
    padding: float  # box growth at evaluation/serving
    shortest_side: bool  # DL-UM grows by a fraction of the shortest side
    augmentation: str = "standard"  # training crops only: see training_input
    square: bool = False  # widen the grown box to a square (preprocess.square_box) so the resize does not stretch it

    def box(self, box: Box, shape: tuple[int, int], padding: float | None = None) -> Box:
        fraction = self.padding if padding is None else padding
        grown = expand_box_by_shortest_side(box, shape, fraction) if self.shortest_side else expand_box(box, shape, fraction)
        return square_box(grown, shape) if self.square else grown

    def tensor(self, roi: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
        return min_max(roi, size) if self.normalisation == "minmax" else standardise(roi, size)

    def evaluation_input(self, sample: LesionSample, size: int) -> npt.NDArray[np.float32]:
        return self.tensor(crop(sample.image, self.box(sample.box, sample.image.shape[:2])), size)

    def training_input(self, sample: LesionSample, size: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
        """One augmented training crop.

        ``standard``: the box shifted by up to 10 % and grown by the serving
        padding +-0.15, a random horizontal flip, gamma and speckle.
        ``strong`` adds what a from-scratch network on ~1,500 lesions lacks:
        shift up to 15 %, each box side scaled 0.85-1.15, rotation +-15
        degrees, contrast, brightness and blur (scanner presets). Vertical
        flips stay out: posterior shadowing and enhancement lie below a
        lesion, never above it.
        """
        x, y, w, h = sample.box
        strong = self.augmentation == "strong"
        reach = 0.15 if strong else 0.1
        dx, dy = (rng.uniform(-reach, reach, 2) * (w, h)).astype(int)
        padding = max(0.0, self.padding + rng.uniform(-0.15, 0.15))
        if strong:
            scaled_w, scaled_h = (max(2, round(side * rng.uniform(0.85, 1.15))) for side in (w, h))
            x, y, w, h = x + (w - scaled_w) // 2, y + (h - scaled_h) // 2, scaled_w, scaled_h
        box = self.box((max(0, x + dx), max(0, y + dy), w, h), sample.image.shape[:2], padding)
        roi = rotated_crop(sample.image, box, rng.uniform(-15, 15)) if strong else crop(sample.image, box)
        if rng.random() < 0.5:
            roi = roi[:, ::-1]
        roi = augment_intensity(np.ascontiguousarray(roi), rng)
        if strong:
            roi = augment_contrast_and_blur(roi, rng)
        return self.tensor(roi, size)


ZSCORE_ROI = RoiStyle("zscore", 0.2, False)
DLUM_ROI = RoiStyle("minmax", 0.3, True)


# --------------------------------------------------------------------------- family specifications


@dataclass(frozen=True)
class FamilySpec:
    """Everything the generic loop needs to know about one family."""

    name: str
    task: str  # "malignancy" or "birads_high"
    datasets: tuple[str, ...]
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    positive_probability: Callable[[nn.Module, Tensor], Tensor]
    roi: RoiStyle
    epochs: int
    batch_size: int
    learning_rate: float
    input_size: int
    # The recipe's release, written into the export and from there into every SR's algorithm version: it changes when
    # the recipe does, so a model is traceable to the recipe that made it (a retrained model of the same recipe keeps
    # the version and differs by its sha256).
    version: str
    notes: str = ""
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None  # default: AdamW over trainable parameters
    push_cycles: int = 1  # MUP-Net: how many times its projection and last-layer stages run (the paper repeats them)
    push_epochs: int = 0  # MUP-Net: joint epochs before each projection after the first
    # Export: store large convolution weights as int8 when what is served stays within tolerance. Set for the two
    # ResNet-50s, which are 47.5 MB each in fp16 against a 150 MB budget for every bundled weight.
    int8_weights: bool = False
    ensemble: int = 1  # seed-ensemble members the recipe trains (RunConfig.ensemble)
    # The seed the shipped model was trained from (its mask pretraining's too), so that `make train-FAMILY` rebuilds
    # that run and not a sibling of it; a recipe whose shipped run was chosen among seeds names the one it shipped.
    seed: int = DEFAULT_SEED


def _softmax_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)[0]
    return functional.cross_entropy(logits, y)


def _softmax_positive(model: nn.Module, x: Tensor) -> Tensor:
    return torch.softmax(model(x)[0], dim=1)[:, 1]


def _deep_supervision(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    block_logits = model(x)[0]
    return dlum.branch_loss(block_logits, y)


def _branch_positive(model: nn.Module, x: Tensor) -> Tensor:
    return torch.sigmoid(model(x)[0][:, -1])


def _mupnet_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    assert isinstance(model, mupnet.MUPNet)
    return mupnet.mupnet_loss(model, model(x[:, None]), y).total


def _mupnet_positive(model: nn.Module, x: Tensor) -> Tensor:
    return torch.softmax(model(x[:, None]).logits, dim=1)[:, 1]


def _mupnet_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Stage 1 of the paper: trunks, add-on layers and prototypes; the last layer stays frozen."""
    assert isinstance(model, mupnet.MUPNet)
    mupnet.set_trainable(model, "joint")
    return mupnet.joint_optimizer(model)


DLUM_WIDTH = 0.25
CLDLR_WIDTH = 0.5

FAMILIES: dict[str, FamilySpec] = {
    "dlr_lh": FamilySpec(
        "dlr_lh", "birads_high", ("busbra", "breast_lesions"), lambda: dlr.DLRNet(depth=50), _softmax_ce, _softmax_positive, ZSCORE_ROI,
        epochs=30, batch_size=16, learning_rate=1e-3, input_size=128, int8_weights=True, version="0.3.0",
        notes="BI-RADS 2/3 (0) vs 4/5 (1) from BUS-BRA and BrEaST (their assessed categories)",
    ),
    "dlr_bm": FamilySpec(
        "dlr_bm", "malignancy", US_DATASETS, lambda: dlr.DLRNet(depth=50), _softmax_ce, _softmax_positive, ZSCORE_ROI,
        epochs=20, batch_size=16, learning_rate=1e-3, input_size=128, int8_weights=True, version="0.8.0", seed=20261122,
        notes="benign (0) vs malignant (1) over every US lesion with a pathology label",
    ),
    "cldlr": FamilySpec(
        "cldlr", "malignancy", US_DATASETS, lambda: cldlr.VGG11Radiomics(width=CLDLR_WIDTH), _softmax_ce, _softmax_positive, ZSCORE_ROI,
        epochs=10, batch_size=16, learning_rate=5e-4, input_size=128, version="0.7.0",
        notes="VGG11 feature network; the SVMs are fitted in the finish stage",
    ),
    "dl_u": FamilySpec(
        "dl_u", "malignancy", US_DATASETS, lambda: dlum.DLUMBranch(width=DLUM_WIDTH), _deep_supervision, _branch_positive, DLUM_ROI,
        epochs=40, batch_size=16, learning_rate=1e-3, input_size=96, version="0.5.0",
        notes="DL-UM ultrasound branch, focal loss on all five block heads",
    ),
    "dl_u_lh": FamilySpec(
        "dl_u_lh", "birads_high", ("busbra", "breast_lesions"), lambda: dlum.DLUMBranch(width=DLUM_WIDTH), _deep_supervision, _branch_positive, DLUM_ROI,
        epochs=40, batch_size=16, learning_rate=1e-3, input_size=96, ensemble=2, version="0.1.0",
        notes="DL-U's network and recipe on DLR_LH's task (BI-RADS 2/3 vs 4/5): a second LH member beside DLR_LH, two seeds",
    ),
    "dl_m": FamilySpec(
        "dl_m", "malignancy", ("mias",), lambda: dlum.DLUMBranch(width=DLUM_WIDTH), _deep_supervision, _branch_positive, DLUM_ROI,
        epochs=30, batch_size=16, learning_rate=1e-3, input_size=96, version="0.2.0",
        notes="DL-UM mammography branch on mini-MIAS finding patches (circle around the listed centre and radius)",
    ),
    "mupnet": FamilySpec(
        "mupnet", "malignancy", US_DATASETS, lambda: mupnet.MUPNet(modalities=1), _mupnet_loss, _mupnet_positive, ZSCORE_ROI,
        epochs=10, batch_size=16, learning_rate=2e-4, input_size=128, optimizer=_mupnet_optimizer, push_cycles=3, push_epochs=5, version="0.7.0",
        notes="MUP-Net with M = 1 (B-mode): no public Doppler or elastography set exists",
    ),
}


def with_roi_padding(spec: FamilySpec, padding: float | None) -> FamilySpec:
    """``spec`` with its lesion box grown by ``padding`` (None: unchanged).

    Training, validation, the export and serving all cut the ROI through
    ``spec.roi``, so one override keeps them in step.
    """
    if padding is None:
        return spec
    if not 0.0 <= padding <= 2.0:
        raise ValueError(f"ROI padding {padding} is outside 0-2 (a fraction of the box added on every side)")
    return replace(spec, roi=replace(spec.roi, padding=padding))


def with_square_roi(spec: FamilySpec, square: bool) -> FamilySpec:
    """``spec`` with square ROIs (:func:`models.inference.preprocess.square_box`) in training, validation, export and serving when ``square``."""
    return replace(spec, roi=replace(spec.roi, square=True)) if square else spec


def with_augmentation(spec: FamilySpec, augmentation: str | None) -> FamilySpec:
    """``spec`` with its training crops augmented the ``augmentation`` way (None: the recipe's); serving is unchanged."""
    if augmentation is None:
        return spec
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation {augmentation!r} is not one of {', '.join(AUGMENTATIONS)}")
    return replace(spec, roi=replace(spec.roi, augmentation=augmentation))


# --------------------------------------------------------------------------- data


def lesion_samples(records: list[Record], task: str) -> list[LesionSample]:
    """Every record with a lesion mask and a label for ``task``."""
    samples = []
    for record in records:
        label = record.malignant if task == "malignancy" else birads_high(record.birads)
        if label is None or record.mask_path is None:
            continue
        image = read_gray(record.image_path)
        box = mask_box(read_mask(record, image.shape))
        if box is not None:
            samples.append(LesionSample(record, image, box, int(label)))
    return samples


def split_samples(spec: FamilySpec, datasets: Path, holdout: str | None = None) -> dict[str, list[LesionSample]]:
    """Train / val / test samples; ``holdout`` drops one dataset from train and val (external validation)."""
    if spec.datasets == ("mias",):
        findings = mias_findings(datasets)
        return {
            split: [LesionSample(r, read_gray(r.image_path), box, int(r.malignant or 0)) for r, box in findings if r.split == split]
            for split in ("train", "val", "test")
        }
    records = load_records(datasets, spec.datasets)
    if holdout:
        records = [r for r in records if r.dataset != holdout or r.split == "test"]
    return {split: lesion_samples([r for r in records if r.split == split], spec.task) for split in ("train", "val", "test")}


# --------------------------------------------------------------------------- network stage


@dataclass(frozen=True)
class RunConfig(TrainConfig):
    """A reference run's settings plus the family and the dataset left out (external validation)."""

    family: str
    holdout: str
    shape_aux: float = 0.0  # weight of the shape-descriptor auxiliary loss (0: the paper's recipe alone)
    birads_aux: float = 0.0  # weight of the BI-RADS-category auxiliary loss (0: the paper's recipe alone)
    swa_epochs: int = 0  # average the weights of the last N epochs instead of keeping the best epoch (0: best epoch)
    init: str = ""  # checkpoint the network starts from (a pretraining run's best.pt); "" = random
    push_cycles: int = 1  # MUP-Net: projection + last-layer cycles (FamilySpec.push_cycles)
    push_epochs: int = 0  # MUP-Net: joint epochs before each projection after the first
    prototype_sources: str = "image"  # MUP-Net: no two prototypes of a modality on one "image" or on one "patient"
    roi_padding: float | None = None  # box growth on every side at serving (None: the family's RoiStyle.padding)
    ensemble: int = 1  # seed-ensemble members (1: one network, the paper's recipe); see member_configs
    augmentation: str | None = None  # training-crop augmentation (RoiStyle.training_input; None: the recipe's)
    mixup: float = 0.0  # Beta(a, a) of mixup between training crops (0: no mixing, the papers' recipes)
    warm_epochs: int = 0  # MUP-Net: the first N epochs train the add-on layers and prototypes only (ProtoPNet's warm-up)
    square_roi: bool = False  # cut square ROIs around the grown box instead of stretching it (RoiStyle.square)


def member_configs(config: RunConfig) -> list[RunConfig]:
    """One run per seed-ensemble member: ``config`` itself when ``ensemble`` is 1.

    Member ``k`` trains in ``WORK/member-k`` with seed ``seed + k``, so member
    0 is the single-network run of the same seed, every member resumes on its
    own, and adding members later leaves the trained ones untouched.
    """
    if config.ensemble < 1:
        raise ValueError(f"an ensemble needs at least one member, not {config.ensemble}")
    if config.ensemble == 1:
        return [config]
    if config.family not in ENSEMBLE_FAMILIES:
        raise ValueError(
            f"{config.family} cannot be a seed ensemble: its side models (SVMs, projected prototypes) belong to one network; "
            f"ensembles are built for {', '.join(sorted(ENSEMBLE_FAMILIES))}"
        )
    return [replace(config, work=str(Path(config.work) / f"member-{k}"), seed=config.seed + k, ensemble=1) for k in range(config.ensemble)]


@torch.no_grad()
def positive_scores(spec: FamilySpec, model: nn.Module, samples: list[LesionSample], size: int, batch: int = 32) -> npt.NDArray[np.float64]:
    """P(positive) for every sample, eval mode, serving-style ROI."""
    model.eval()
    device = device_of(model)
    scores: list[float] = []
    for start in range(0, len(samples), batch):
        x = torch.from_numpy(np.concatenate([spec.roi.evaluation_input(s, size) for s in samples[start : start + batch]])).to(device)
        scores.extend(float(v) for v in spec.positive_probability(model, x).float().cpu())
    return np.asarray(scores)


SHAPE_TARGETS = ("circularity", "solidity", "convexity", "elongation", "orientation", "radial_roughness", "ellipse_mismatch", "lobulations")


def shape_targets(samples: list[LesionSample]) -> npt.NDArray[np.float32]:
    """The :data:`SHAPE_TARGETS` lexicon descriptors of each sample's ground-truth outline (largest region), z-scored.

    Training-only "privileged information": the radiologists' outlines say
    how regular a margin is, which a benign/malignant label alone does not.
    Horizontal flips, the only geometric augmentation of the ROI, leave them unchanged.
    """
    from models.inference.lexicon import DESCRIPTOR_NAMES, describe

    columns = [DESCRIPTOR_NAMES.index(name) for name in SHAPE_TARGETS]
    rows = []
    for sample in samples:
        mask = read_mask(sample.record, sample.image.shape)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        largest = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 1 else mask.astype(bool)
        rows.append(describe(sample.image, largest)[columns])
    values = np.asarray(rows, dtype=np.float64)
    values[:, SHAPE_TARGETS.index("lobulations")] = np.log1p(values[:, SHAPE_TARGETS.index("lobulations")])
    standardised: npt.NDArray[np.float32] = ((values - values.mean(0)) / (values.std(0) + 1e-6)).astype(np.float32)
    return standardised


class AuxiliaryHead(nn.Module):
    """Training-only linear head from a family's pooled features (its second output) to per-lesion targets.

    It reads the features through a forward hook, so the family's own loss
    runs the network once; it is not part of the exported model.
    """

    def __init__(self, model: nn.Module, input_size: int, outputs: int, flag: str) -> None:
        super().__init__()
        self._captured: list[Tensor] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(torch.zeros(2, 1, input_size, input_size))
        except ValueError:  # MUP-Net takes (B, M, 1, H, W) and returns no pooled features
            output = None
        model.train(was_training)
        if not isinstance(output, tuple) or output[1].dim() != 2:
            raise SystemExit(f"{flag} needs a family whose network returns pooled features as its second output (dlr_lh, dlr_bm, cldlr, dl_u)")
        self.linear = nn.Linear(int(output[1].shape[1]), outputs)
        model.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, _inputs: object, outputs: tuple[Tensor, ...]) -> None:
        if module.training:  # evaluation passes are not trained on
            self._captured[:] = [outputs[1]]

    def predicted(self) -> Tensor:
        """The head's output for the last training forward pass."""
        predicted: Tensor = self.linear(self._captured.pop().float())
        return predicted


class ShapeHead(AuxiliaryHead):
    """Regresses the :data:`SHAPE_TARGETS` of the ground-truth outline (``--shape-aux``)."""

    def __init__(self, model: nn.Module, input_size: int) -> None:
        super().__init__(model, input_size, len(SHAPE_TARGETS), "--shape-aux")

    def loss(self, targets: Tensor) -> Tensor:
        """Mean squared error of the last training forward pass's predicted targets."""
        return functional.mse_loss(self.predicted(), targets)


#: BI-RADS final assessment categories in the order of their likelihood of malignancy (4a-4c pooled as 4).
BIRADS_ORDER = ("2", "3", "4", "5")


def birads_targets(samples: list[LesionSample]) -> npt.NDArray[np.float32]:
    """Cumulative ordinal targets ``[category > 2, > 3, > 4]`` of each sample's BI-RADS; NaN where it has none.

    Training-only privileged information, like :func:`shape_targets`: the
    radiologists' category grades how suspicious a lesion looked (a benign
    BI-RADS 4 against a benign BI-RADS 2), which the biopsy label alone does
    not. BUSI has no categories, so its rows are NaN and carry no loss.
    Category 1 (no finding) counts as 2.
    """
    rows = []
    for sample in samples:
        category = sample.record.birads[:1].replace("1", "2")
        if category in BIRADS_ORDER:
            rank = BIRADS_ORDER.index(category)
            rows.append([float(rank > k) for k in range(len(BIRADS_ORDER) - 1)])
        else:
            rows.append([math.nan] * (len(BIRADS_ORDER) - 1))
    return np.asarray(rows, dtype=np.float32)


class BiradsHead(AuxiliaryHead):
    """Cumulative-logit ordinal regression of the BI-RADS category (``--birads-aux``)."""

    def __init__(self, model: nn.Module, input_size: int) -> None:
        super().__init__(model, input_size, len(BIRADS_ORDER) - 1, "--birads-aux")

    def loss(self, targets: Tensor) -> Tensor:
        """Binary cross-entropy of each cumulative threshold, over the lesions that have a category."""
        logits = self.predicted()
        known = ~torch.isnan(targets)
        if not bool(known.any()):
            return logits.sum() * 0.0  # keeps the graph; this batch has no category
        return functional.binary_cross_entropy_with_logits(logits[known], targets[known])


class WeightAverage:
    """Running mean of a network's weights over the last epochs (stochastic weight averaging, Izmailov et al. 2018).

    The mean and the epochs it holds persist in ``swa.pt`` after every
    epoch, so a resumed run neither loses nor double-counts one.
    """

    def __init__(self, work: Path) -> None:
        self.path = work / "swa.pt"
        state = torch.load(self.path, map_location="cpu", weights_only=False) if self.path.is_file() else {}
        self.mean: dict[str, Tensor] = state.get("model", {})
        self.epochs: list[int] = state.get("epochs", [])

    def add(self, model: nn.Module, epoch: int) -> None:
        if epoch in self.epochs:
            return
        count = len(self.epochs)
        for name, value in model.state_dict().items():
            weights = value.detach().cpu()  # the mean lives on the CPU, as it is loaded on resume, whatever the training device
            if not weights.is_floating_point() or name not in self.mean:
                self.mean[name] = weights.clone()
            else:
                self.mean[name] += (weights - self.mean[name]) / (count + 1)
        self.epochs.append(epoch)
        self.save()

    def save(self, **extra: object) -> None:
        torch.save({"model": self.mean, "epochs": self.epochs, **extra}, self.path.with_suffix(".tmp"))
        self.path.with_suffix(".tmp").replace(self.path)


@torch.no_grad()
def recompute_batch_norm(spec: FamilySpec, model: nn.Module, batches: Sequence[Tensor]) -> None:
    """Batch-norm statistics of averaged weights, from training batches (an averaged network's own are stale)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative mean over the batches
    model.train()
    for x in batches:
        spec.positive_probability(model, x.to(device_of(model)))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def load_initial_weights(model: nn.Module, checkpoint: Path) -> None:
    """Start ``model`` from a checkpoint of the same network (``models.training.pretrain``'s best.pt).

    Every tensor must match by name and shape: a checkpoint of another
    architecture is refused instead of half-loaded.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"--init {checkpoint} does not fit this network: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")


class BalancedBatches:
    """Augmented training batches drawn with replacement, both classes equally often.

    Balanced sampling instead of a weighted loss: focal and cross-entropy
    losses then see both classes equally.
    """

    def __init__(self, spec: FamilySpec, train: list[LesionSample], config: RunConfig) -> None:
        self.spec, self.train, self.config = spec, train, config
        self.labels = np.array([s.label for s in train])
        positives, negatives = max(1, int((self.labels == 1).sum())), max(1, int((self.labels == 0).sum()))
        self.weights = np.where(self.labels == 1, 0.5 / positives, 0.5 / negatives)
        self.steps_per_epoch = max(1, len(train) // config.batch_size)

    def draw(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.int64], Tensor, Tensor]:
        """Indices, augmented inputs and labels of one batch."""
        index = rng.choice(len(self.train), size=self.config.batch_size, p=self.weights)
        x = torch.from_numpy(np.concatenate([self.spec.roi.training_input(self.train[i], self.config.input_size, rng) for i in index]))
        return index, x, torch.from_numpy(self.labels[index]).long()


class OneForward(nn.Module):
    """Runs the wrapped network on its first call and returns those outputs to every later call.

    Mixup scores one forward pass against two label sets; the family losses
    call the network themselves, so this lets two of them share one pass and
    one backward graph.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.outputs: Any = None

    def forward(self, x: Tensor) -> Any:
        if self.outputs is None:
            self.outputs = self.model(x)
        return self.outputs


#: Families whose loss ties each training image to one class beyond its label: MUP-Net's cluster and separation costs
#: pull an image's patches towards its own class's prototypes, which a blend of two images does not have.
MIXUP_REFUSED = frozenset({"mupnet"})


def check_warm_epochs(config: RunConfig) -> None:
    """Warm-up epochs are MUP-Net's stage before stage 1, and must leave joint epochs after them."""
    if config.warm_epochs == 0:
        return
    if config.family != "mupnet":
        raise ValueError("--warm-epochs is MUP-Net's warm-up (trunk frozen while the prototypes settle); other families have none")
    if not 0 < config.warm_epochs < config.epochs:
        raise ValueError(f"--warm-epochs must lie between 1 and --epochs - 1 ({config.epochs - 1}), not {config.warm_epochs}")


def set_epoch_stage(model: nn.Module, epoch: int, config: RunConfig) -> None:
    """MUP-Net's trunk stays frozen through the warm-up epochs (its optimiser skips parameters without a gradient)."""
    if isinstance(model, mupnet.MUPNet) and config.warm_epochs:
        mupnet.set_trainable(model, "warm" if epoch < config.warm_epochs else "joint")


# Settings that make a different network: a checkpoint trained under other values must not be resumed under these
# (its export would name the new start or recipe while holding the old weights). Epochs may grow, threads and
# time limits may change between sessions.
RUN_DEFINING = (
    "family", "holdout", "init", "seed", "batch_size", "learning_rate", "input_size", "shape_aux", "birads_aux",
    "roi_padding", "augmentation", "mixup", "warm_epochs", "square_roi",
)


def check_mixup(config: RunConfig) -> None:
    """Refuse mixup where its blended images would not mean what the loss assumes."""
    if config.mixup < 0:
        raise ValueError(f"--mixup is a Beta distribution's parameter and must be positive, not {config.mixup}")
    if config.mixup == 0:
        return
    if config.family in MIXUP_REFUSED:
        raise ValueError(f"{config.family} cannot train with mixup: its prototype costs tie each image to one class")
    if config.shape_aux > 0 or config.birads_aux > 0:
        raise ValueError("mixup cannot be combined with --shape-aux or --birads-aux: a blended crop has no single outline or category")


def mixup_loss(spec: FamilySpec, model: nn.Module, x: Tensor, y: Tensor, alpha: float, rng: np.random.Generator) -> Tensor:
    """The family's loss on a batch blended with a shuffled copy of itself (Zhang et al., ICLR 2018).

    Each crop becomes ``lam * x + (1 - lam) * x[partner]`` with one
    ``lam ~ Beta(alpha, alpha)`` per batch, and the loss is the same blend of
    the family's loss against either label, so every family loss (softmax
    cross-entropy, DL-UM's focal deep supervision) works unchanged.
    """
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(len(y))).to(x.device)
    once = OneForward(model)
    mixed = lam * x + (1.0 - lam) * x[partner]
    return lam * spec.loss(once, mixed, y) + (1.0 - lam) * spec.loss(once, mixed, y[partner])


def train_network(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> None:
    """Class-balanced mini-batches, AdamW with warm-up + cosine decay, best by validation AUC.

    With ``config.shape_aux`` > 0 the loss adds that weight times the
    :class:`ShapeHead`'s error on the ground-truth outline's shape descriptors;
    with ``config.birads_aux`` > 0, that weight times the :class:`BiradsHead`'s
    error on the BI-RADS category. With ``config.mixup`` > 0 each batch is
    blended with a shuffled copy of itself (:func:`mixup_loss`). With ``config.swa_epochs`` > 0 the exported
    network is the mean of the last that many epochs' weights (``swa.pt``),
    its batch-norm statistics recomputed, instead of the best validation epoch.
    """
    train, val = samples["train"], samples["val"]
    model = spec.build()
    if config.init:
        load_initial_weights(model, Path(config.init))
    shape_head = ShapeHead(model, config.input_size) if config.shape_aux > 0 else None
    targets = torch.from_numpy(shape_targets(train)) if shape_head is not None else None
    birads_head = BiradsHead(model, config.input_size) if config.birads_aux > 0 else None
    categories = torch.from_numpy(birads_targets(train)) if birads_head is not None else None
    device = training_device(config.device)
    for part in (model, shape_head, birads_head):
        if part is not None:
            to_training_device(part, device)  # before the optimiser is built, so that it holds the moved parameters
    if spec.optimizer is not None:
        optimizer = spec.optimizer(model, config.learning_rate)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=1e-4)
    for head in (shape_head, birads_head):
        if head is not None:
            optimizer.add_param_group({"params": list(head.parameters()), "lr": config.learning_rate, "weight_decay": 1e-4})
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])  # per-group rates keep their ratios under the schedule
    checkpoints = Checkpoints(Path(config.work))
    heads = {name: head for name, head in (("shape_head", shape_head), ("birads_head", birads_head)) if head is not None}
    start, best = checkpoints.resume(model, optimizer, heads)
    average = WeightAverage(Path(config.work)) if config.swa_epochs > 0 else None
    rng = np.random.default_rng(config.seed + start)
    sampler = BalancedBatches(spec, train, config)
    steps_per_epoch = sampler.steps_per_epoch
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        set_epoch_stage(model, epoch, config)
        losses = []
        for step in range(steps_per_epoch):
            index, x, y = sampler.draw(rng)
            x, y = x.to(device), y.to(device)
            cosine_lr(optimizer, config.learning_rate, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch, steps_per_epoch)
            with mixed_precision(device, config.bf16):
                loss = mixup_loss(spec, model, x, y, config.mixup, rng) if config.mixup > 0 else spec.loss(model, x, y)
            if shape_head is not None and targets is not None:
                loss = loss.float() + config.shape_aux * shape_head.loss(targets[index].to(device))
            if birads_head is not None and categories is not None:
                loss = loss.float() + config.birads_aux * birads_head.loss(categories[index].to(device))
            losses.append(optimise_step(optimizer, loss.float()))
        score = auc([s.label for s in val], positive_scores(spec, model, val, config.input_size))
        if average is not None and epoch >= config.epochs - config.swa_epochs:
            average.add(model, epoch)
        best, stop = checkpoints.end_epoch(model, optimizer, epoch, losses, "val_auc", score, best, began, config, heads)
        if stop:
            break
    if average is not None and average.epochs and average.epochs[-1] == config.epochs - 1:
        finish_weight_average(spec, config, train, val, average, rng)


def finish_weight_average(
    spec: FamilySpec, config: RunConfig, train: list[LesionSample], val: list[LesionSample], average: WeightAverage, rng: np.random.Generator
) -> None:
    """Load the averaged weights, recompute batch-norm statistics on one epoch of training crops, score and save."""
    model = to_training_device(spec.build(), training_device(config.device))  # one epoch of forward passes and the validation scores: on the GPU where there is one
    model.load_state_dict(average.mean)
    batches = [
        torch.from_numpy(np.concatenate([spec.roi.training_input(train[i], config.input_size, rng) for i in rng.choice(len(train), size=config.batch_size)]))
        for _ in range(max(1, len(train) // config.batch_size))
    ]
    recompute_batch_norm(spec, model, batches)
    score = auc([s.label for s in val], positive_scores(spec, model, val, config.input_size))
    average.mean = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # the mean is kept on the CPU
    average.save(score=score, final=True)
    Checkpoints(Path(config.work)).log({"part": config.part, "swa_epochs": average.epochs, "val_auc": score})


def load_best(spec: FamilySpec, work: Path) -> nn.Module:
    """The family's network to export, in eval mode: the finished weight average if the run made one, else the best epoch."""
    model = spec.build()
    model.load_state_dict(torch.load(chosen_checkpoint(work), map_location="cpu", weights_only=False)["model"])
    return model.eval()


def chosen_checkpoint(work: Path) -> Path:
    """``swa.pt`` once a ``--swa-epochs`` run has finished its average, else ``best.pt``."""
    swa = work / "swa.pt"
    if swa.is_file() and torch.load(swa, map_location="cpu", weights_only=False).get("final"):
        return swa
    return work / "best.pt"


# --------------------------------------------------------------------------- finish stage


def clinical_features(sample: LesionSample) -> list[float]:
    """CLDLR's clinical variables that DICOM can carry: age and maximum lesion diameter.

    ``[age / 100, age known, max diameter mm / 50, diameter known]``: a
    missing value is 0 with its flag 0, so the SVM runs without it.
    """
    age = dlr.clinical_vector(sample.record.age_years)
    spacing = sample.record.pixel_spacing_mm
    diameter = [0.0, 0.0] if spacing is None else [max(sample.box[2], sample.box[3]) * spacing / 50.0, 1.0]
    return age + diameter


@torch.no_grad()
def network_outputs(spec: FamilySpec, model: nn.Module, samples: list[LesionSample], size: int, batch: int = 32) -> npt.NDArray[np.float32]:
    """The network's second output (DLR embedding, CLDLR deep features) for every sample."""
    model.eval()
    device = device_of(model)
    rows = []
    for start in range(0, len(samples), batch):
        x = torch.from_numpy(np.concatenate([spec.roi.evaluation_input(s, size) for s in samples[start : start + batch]])).to(device)
        rows.append(model(x)[1].float().cpu().numpy())
    return np.concatenate(rows).astype(np.float32)


def finish_dlr(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> dict[str, float]:
    """Train the paper's MLP over [128-d embedding, age] on frozen embeddings; best by validation AUC."""
    work = Path(config.work)
    model = load_best(spec, work)
    data = {}
    for split in ("train", "val"):
        embedding = torch.from_numpy(network_outputs(spec, model, samples[split], config.input_size))
        clinical = torch.tensor([dlr.clinical_vector(s.record.age_years) for s in samples[split]], dtype=torch.float32)
        data[split] = (embedding, clinical, torch.tensor([s.label for s in samples[split]]))
    mlp = dlr.AgeFusionMLP()
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    best, best_state = -1.0, mlp.state_dict()
    embedding, clinical, labels = data["train"]
    for epoch in range(60):
        mlp.train()
        for index in torch.randperm(len(labels), generator=generator).split(32):
            optimise_step(optimizer, functional.cross_entropy(mlp(embedding[index], clinical[index]), labels[index]))
        mlp.eval()
        with torch.no_grad():
            score = auc(data["val"][2].numpy(), torch.softmax(mlp(data["val"][0], data["val"][1]), 1)[:, 1].numpy())
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in mlp.state_dict().items()}
    torch.save(best_state, work / "mlp.pt")
    return {"mlp_val_auc": best, "train_with_age": float(data["train"][1][:, 1].sum())}


def finish_cldlr(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> dict[str, float]:
    """Fit the three SVMs the paper compares (clinical, DLR, CLDLR) with Platt scaling on validation data."""
    from sklearn.svm import SVC

    from models.inference.svm import SvmModel, fit_platt

    work = Path(config.work)
    model = load_best(spec, work)
    deep = {split: network_outputs(spec, model, samples[split], config.input_size) for split in ("train", "val")}
    clinical = {split: np.array([clinical_features(s) for s in samples[split]], dtype=np.float32) for split in ("train", "val")}
    labels = {split: np.array([s.label for s in samples[split]]) for split in ("train", "val")}
    summary: dict[str, float] = {}
    for variant, features in (
        ("clinical", clinical),
        ("dlr", deep),
        ("cldlr", {split: np.concatenate([deep[split], clinical[split]], axis=1) for split in ("train", "val")}),
    ):
        mean = features["train"].mean(0)
        scale = features["train"].std(0) + 1e-6
        machine = SVC(kernel="rbf", C=1.0, gamma="scale").fit((features["train"] - mean) / scale, labels["train"])
        svm = SvmModel(
            mean=mean.astype(np.float64),
            scale=scale.astype(np.float64),
            support_vectors=np.asarray(machine.support_vectors_, dtype=np.float64),
            dual_coefficients=np.asarray(machine.dual_coef_[0], dtype=np.float64),
            intercept=float(machine.intercept_[0]),
            gamma=float(machine._gamma),
            platt_a=0.0,
            platt_b=0.0,
        )
        platt_a, platt_b = fit_platt(svm.decision(features["val"]), labels["val"])
        svm = SvmModel(**{**svm.__dict__, "platt_a": platt_a, "platt_b": platt_b})
        svm.save(work / f"svm_{variant}.npz")
        summary[f"{variant}_val_auc"] = auc(labels["val"], svm.probability(features["val"]))
    return summary


#: Joint-stage rates after a projection, as a fraction of stage 1's: the paper divides its rate by ten every 5 epochs.
PUSH_JOINT_RATE = 0.1
LAST_LAYER_EPOCHS = 8


def finish_mupnet(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> dict[str, Any]:
    """Paper stages 2 and 3, and the paper's repetition of all three stages.

    Each cycle projects every prototype onto an own-class training patch
    (:func:`models.families.mupnet.network.project_prototypes`, each prototype on a
    different image), then trains the last layer alone for
    :data:`LAST_LAYER_EPOCHS` epochs, keeping its best validation epoch. The
    paper: "These three stages were repeated throughout the whole training
    process." So every cycle after the first begins with ``config.push_epochs``
    joint epochs (stage 1 again: trunk, add-on layers and prototypes, last
    layer frozen) at :data:`PUSH_JOINT_RATE` of stage 1's rates, from the
    previous cycle's model, in the precision stage 1 trained in
    (``--bf16``: bfloat16 autocast). The last-layer epochs train on
    :class:`models.families.mupnet.network.FrozenEvidence` computed once after the
    projection, which gives the same updates as running the frozen trunk
    over the images every epoch. Of the ``config.push_cycles`` cycles, the one
    whose projected model scores highest on validation is kept, as ProtoPNet
    keeps its best post-projection checkpoint.

    Candidates follow the paper's BI-RADS rule for B-mode (benign from
    BI-RADS 3/4a, malignant from 4c/5; 2 counts as benign): only BUS-BRA and
    BrEaST images carry BI-RADS, so BUSI images are never prototypes.
    """
    work = Path(config.work)
    device = training_device(config.device)
    model = to_training_device(load_best(spec, work), device)  # its repeated joint epochs are whole-network training
    assert isinstance(model, mupnet.MUPNet)
    train, val_labels = samples["train"], [s.label for s in samples["val"]]
    images = torch.from_numpy(np.concatenate([spec.roi.evaluation_input(s, config.input_size) for s in train]))[:, None]
    labels = torch.tensor([s.label for s in train])
    # Projection by pathology (the classes of the prototypes), restricted by BI-RADS as the paper does.
    eligible = mupnet.projection_eligibility([s.record.birads or None for s in train], labels, modalities=("bmode",))
    projection_batches = [(images[k : k + 32], labels[k : k + 32], eligible[k : k + 32]) for k in range(0, len(train), 32)]
    val_inputs = [torch.from_numpy(np.concatenate([spec.roi.evaluation_input(s, config.input_size) for s in samples["val"][k : k + 32]])) for k in range(0, len(samples["val"]), 32)]
    generator = np.random.default_rng(config.seed)
    sampler = BalancedBatches(spec, train, config)
    cycles: list[dict[str, float]] = []
    best_score = -math.inf
    for cycle in range(max(1, config.push_cycles)):
        if cycle:
            optimizer = mupnet.joint_optimizer(model, rate_scale=PUSH_JOINT_RATE)
            for _ in range(config.push_epochs):
                batches = [sampler.draw(generator)[1:] for _ in range(sampler.steps_per_epoch)]
                mupnet.train_joint_epoch(model, [(x[:, None], y) for x, y in batches], optimizer, precision=lambda: mixed_precision(device, config.bf16))
        after_joint = auc(val_labels, positive_scores(spec, model, samples["val"], config.input_size))
        groups = [s.record.patient for s in train] if config.prototype_sources == "patient" else None
        record = mupnet.project_prototypes(model, projection_batches, source_groups=groups)
        # Only the last layer moves from here to the cycle's end: the trunks run once, not once per epoch.
        train_evidence = mupnet.frozen_evidence(model, (batch for batch, _, _ in projection_batches))
        val_evidence = mupnet.frozen_evidence(model, (x[:, None] for x in val_inputs))
        after_projection = auc(val_labels, mupnet.evidence_probability(model, val_evidence)[:, 1].cpu().numpy())
        best_layer, best_state = after_projection, copy.deepcopy(model.state_dict())
        optimizer = mupnet.last_layer_optimizer(model)
        for _ in range(LAST_LAYER_EPOCHS):
            order = torch.from_numpy(generator.permutation(len(train)))
            shuffled = [(train_evidence.take(order[k : k + 32]), labels[order[k : k + 32]]) for k in range(0, len(train), 32)]
            mupnet.train_last_layer_epoch(model, shuffled, optimizer)
            score = auc(val_labels, mupnet.evidence_probability(model, val_evidence)[:, 1].cpu().numpy())
            if score > best_layer:
                best_layer, best_state = score, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        cycles.append({"val_auc_before_projection": after_joint, "val_auc_after_projection": after_projection, "val_auc_after_last_layer": best_layer})
        print(json.dumps({"family": spec.name, "cycle": cycle, **cycles[-1]}), flush=True)
        if best_layer > best_score:
            best_score = best_layer
            torch.save({"model": model.state_dict(), "cycle": cycle}, work / "projected.pt")
            _save_prototypes(record, train, images, work)
    chosen = int(torch.load(work / "projected.pt", map_location="cpu", weights_only=False)["cycle"])
    return {
        "cycles": cycles,
        "push_epochs": config.push_epochs,
        "chosen_cycle": chosen,
        "val_auc": best_score,
        "prototype_sources": f"one {config.prototype_sources} per prototype, per modality",
    }


def _save_prototypes(record: mupnet.ProjectionRecord, train: list[LesionSample], images: Tensor, work: Path) -> None:
    """``prototypes.json`` (where each prototype came from) and ``prototype_patches.npz`` (64 px pictures of them)."""
    sources = [{**row, "source_id": f"{train[int(row['source_index'])].record.dataset}/{train[int(row['source_index'])].record.image_id}"} for row in record.as_dicts()]
    (work / "prototypes.json").write_text(json.dumps(sources, indent=2))
    patches = []
    for row in sources:
        y0, x0, y1, x1 = (int(v) for v in row["activation_box"])
        picture = images[int(row["source_index"]), 0, 0].numpy()
        picture = (255 * (picture - picture.min()) / max(1e-6, float(picture.max() - picture.min()))).astype(np.uint8)
        patch = picture[y0:y1, x0:x1] if y1 > y0 and x1 > x0 else picture
        patches.append(cv2.resize(patch, (64, 64), interpolation=cv2.INTER_AREA))
    np.savez_compressed(work / "prototype_patches.npz", patches=np.stack(patches), classes=np.array([int(r["class"]) for r in sources]))


FINISHERS: dict[str, Callable[[FamilySpec, RunConfig, dict[str, list[LesionSample]]], dict[str, Any]]] = {
    "dlr_lh": finish_dlr,
    "dlr_bm": finish_dlr,
    "cldlr": finish_cldlr,
    "mupnet": finish_mupnet,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--stage", choices=("network", "finish", "export", "all"), default="all")
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--work", default=None, help="checkpoint folder (default runs/families/FAMILY[-without-HOLDOUT])")
    parser.add_argument("--holdout", default="", help="leave this dataset out of training (external validation)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "weights"), help="model folder the export writes into (its manifest is updated)")
    parser.add_argument("--seed", type=int, help="default: the seed the shipped model was trained from (the recipe's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--max-minutes", type=float, default=float("inf"), help="stop after the epoch that crosses this")
    parser.add_argument("--bf16", action="store_true", help="train the network under bfloat16 autocast (CPU with AVX512-BF16/AMX, or a GPU)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: a CUDA GPU where torch sees one, else the CPU; checkpoints and the export stay device-independent")
    parser.add_argument("--shape-aux", type=float, default=0.0, help="weight of the training-only shape-descriptor loss (0: the paper's recipe alone)")
    parser.add_argument("--birads-aux", type=float, default=0.0, help="weight of the training-only BI-RADS-category loss (ordinal; lesions without a category carry none)")
    parser.add_argument("--swa-epochs", type=int, default=0, help="export the mean of the last N epochs' weights (batch norm recomputed) instead of the best validation epoch")
    parser.add_argument("--push-cycles", type=int, help="MUP-Net: projection + last-layer cycles (default: the recipe's)")
    parser.add_argument("--push-epochs", type=int, help="MUP-Net: joint epochs before each projection after the first (default: the recipe's)")
    parser.add_argument(
        "--prototype-sources", choices=("image", "patient"), default="image",
        help="MUP-Net: each prototype from a different image (default) or a different patient",
    )
    parser.add_argument("--roi-padding", type=float, help="grow the lesion box by this fraction on every side (default: the family's); the export records it for serving")
    parser.add_argument(
        "--ensemble", type=int,
        help="train this many members from seeds SEED, SEED+1, ... (in WORK/member-K) and export their mean as one graph "
        "(dl_u, dl_m, dlr_bm, dlr_lh; default: the recipe's)",
    )
    parser.add_argument(
        "--augmentation", choices=AUGMENTATIONS,
        help="training-crop augmentation: standard (shift, padding, flip, gamma, speckle) or strong (adds rotation, box "
        "scaling, contrast, brightness, blur); default: the recipe's",
    )
    parser.add_argument(
        "--mixup", type=float, default=0.0,
        help="blend each training batch with a shuffled copy of itself, weights from Beta(A, A) (e.g. 0.2; 0: off, the papers' recipes)",
    )
    parser.add_argument(
        "--warm-epochs", type=int, default=0,
        help="MUP-Net: the first N of --epochs train the add-on layers and prototypes only, the trunk frozen (ProtoPNet's warm-up; 0: none)",
    )
    parser.add_argument(
        "--square-roi", action="store_true",
        help="cut a square around the grown lesion box (its short side widened) so that the resize keeps the lesion's shape and "
        "orientation; default: the box itself, stretched to the input size as the papers' crops are; the export records it for serving",
    )
    parser.add_argument("--init", default="", help="start the network from this checkpoint (e.g. runs/pretrain/dl_u/best.pt from models.training.pretrain); default: random")
    args = parser.parse_args(argv)
    spec = FAMILIES[args.family]
    suffix = f"-without-{args.holdout}" if args.holdout else ""
    config = RunConfig(
        part=spec.name,
        family=spec.name,
        datasets=args.datasets,
        work=args.work or f"runs/families/{spec.name}{suffix}",
        holdout=args.holdout,
        epochs=args.epochs or spec.epochs,
        batch_size=args.batch_size or spec.batch_size,
        learning_rate=args.learning_rate or spec.learning_rate,
        input_size=args.input_size or spec.input_size,
        seed=args.seed if args.seed is not None else spec.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        device=args.device,
        shape_aux=args.shape_aux,
        birads_aux=args.birads_aux,
        swa_epochs=args.swa_epochs,
        init=args.init,
        push_cycles=args.push_cycles if args.push_cycles is not None else spec.push_cycles,
        push_epochs=args.push_epochs if args.push_epochs is not None else spec.push_epochs,
        prototype_sources=args.prototype_sources,
        roi_padding=args.roi_padding,
        ensemble=args.ensemble if args.ensemble is not None else spec.ensemble,
        augmentation=args.augmentation,
        mixup=args.mixup,
        warm_epochs=args.warm_epochs,
        square_roi=args.square_roi,
    )
    try:
        check_mixup(config)
        check_warm_epochs(config)
        members = member_configs(config)
    except ValueError as exc:
        parser.error(str(exc))
    spec = with_square_roi(with_augmentation(with_roi_padding(spec, config.roi_padding), config.augmentation), config.square_roi)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    work = Path(config.work)
    check_resumable(work, asdict(config), RUN_DEFINING)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps({**asdict(config), "notes": spec.notes}, indent=2))
    samples = split_samples(spec, Path(config.datasets), config.holdout or None)
    print(json.dumps({"family": spec.name, **{k: len(v) for k, v in samples.items()}}), flush=True)
    for member in members:
        member_work = Path(member.work)
        if member is not config:
            check_resumable(member_work, asdict(member), RUN_DEFINING)
            member_work.mkdir(parents=True, exist_ok=True)
            (member_work / "config.json").write_text(json.dumps({**asdict(member), "notes": spec.notes}, indent=2))
            seed_everything(member.seed)
        if args.stage in ("network", "all"):
            train_network(spec, member, samples)
        if args.stage in ("finish", "all") and spec.name in FINISHERS:
            summary = FINISHERS[spec.name](spec, member, samples)
            (member_work / "finish.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps({"family": spec.name, "work": member.work, "finished": summary}), flush=True)
    if args.stage in ("export", "all"):
        from models.training.export_family import export_family

        export_family(spec, config, samples, Path(args.output))


if __name__ == "__main__":
    main()
