"""Pieces every training recipe shares: seeding, augmentation, LR schedule, checkpoints.

Checkpoints are resumable: ``last.pt`` after every epoch (model, optimiser,
epoch, best score) and ``best.pt`` when the validation score improves, so
an interrupted run continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.errors import TrainingError


class RunSettings(Protocol):
    """What :func:`begin_run` reads of a run's frozen settings (a dataclass instance)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def threads(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def work(self) -> str: ...


class RunLimits(Protocol):
    """What :meth:`Checkpoints.end_epoch` needs to know about a run."""

    @property
    def part(self) -> str: ...

    @property
    def max_minutes(self) -> float: ...


DEVICES = ("auto", "cpu", "cuda")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def training_device(requested: str) -> torch.device:
    """Where a recipe trains: ``auto`` takes the first CUDA GPU torch can use, else the CPU.

    Checkpoints are loaded onto the CPU and the export runs there, so a run
    may be resumed or exported on another kind of machine than it began on.

    Raises
    ------
    TrainingError
        ``cuda`` was asked for and torch sees no CUDA GPU (a CPU build of torch, no driver, or no device).
    """
    if requested not in DEVICES:
        raise TrainingError(f"unknown training device {requested!r}: one of {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError(
            "--device cuda: torch sees no CUDA GPU here (a CPU build of torch, no driver, or no device); use --device "
            "cpu or auto"
        )
    return torch.device("cuda")


def to_training_device(module: ModuleT, device: torch.device, channels_last: bool = True) -> ModuleT:
    """Move ``module`` to ``device``, its 4-D weights in channels-last (NHWC) layout unless ``channels_last`` is false.

    oneDNN runs NHWC convolutions faster on the CPU (cuDNN's tensor-core
    kernels prefer NHWC as well, by NVIDIA's guidance; not measured here, as
    no GPU was lent), and a convolution whose weight is NHWC makes its output NHWC,
    so the whole network follows without converting the one-channel inputs.
    One training step at one thread on a 2-core Xeon (Emerald Rapids), the
    layout's time over the default's: DLR's ResNet-50 0.75 (bfloat16),
    CLDLR's VGG11 0.68, DL-U 0.74, MUP-Net 0.83, mask pretraining
    0.58-0.79, the segmenter 0.77 (float32). The refiner's instance norm is
    slower in NHWC (1.13): it keeps the default. The layout is memory
    order only: checkpoints load into either, and the export is unchanged.
    """
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit this keyword of Module.to
    return module


def device_of(model: nn.Module) -> torch.device:
    """The device ``model``'s weights (or buffers) are on, where inputs are sent; the CPU for a module that holds
    neither.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def mixed_precision(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on ``device`` when ``enabled`` (``--bf16``); weights and optimiser state stay fp32.

    Raises
    ------
    TrainingError
        ``enabled`` on a GPU without native bfloat16 (before Ampere): torch
        would emulate it, many times slower than float32, without a word.
    """
    if enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise TrainingError(
            f"--bf16: {torch.cuda.get_device_name(device)} has no native bfloat16; train without --bf16 on it"
        )
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment_geometry(
    image: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8] | None, rng: np.random.Generator
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8] | None]:
    """Random horizontal flip, scale 0.85-1.15, rotation +-10 degrees, shift +-8 %."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
        mask = mask[:, ::-1] if mask is not None else None
    rows, cols = image.shape
    matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), rng.uniform(-10, 10), rng.uniform(0.85, 1.15))
    matrix[:, 2] = matrix[:, 2] + rng.uniform(-0.08, 0.08, 2) * (cols, rows)
    warped = np.asarray(
        cv2.warpAffine(
            np.ascontiguousarray(image), matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        ),
        dtype=np.uint8,
    )
    warped_mask: npt.NDArray[np.uint8] | None = None
    if mask is not None:
        warped_mask = np.asarray(
            cv2.warpAffine(
                np.ascontiguousarray(mask),
                matrix,
                (cols, rows),
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_CONSTANT,
            ),
            dtype=np.uint8,
        )
    return warped, warped_mask


def augment_intensity(image: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Random gamma 0.7-1.4 and speckle-like multiplicative noise."""
    scaled = (image.astype(np.float32) / 255.0) ** rng.uniform(0.7, 1.4)
    scaled *= rng.normal(1.0, 0.05, scaled.shape).astype(np.float32)
    noisy: npt.NDArray[np.uint8] = np.clip(scaled * 255.0, 0, 255).astype(np.uint8)
    return noisy


def bce_soft_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus the mean per-image soft Dice loss, for (N, 1, H, W) logits and a 0/1 target.

    The Dice term is smoothed by 1, so an image without a lesion (all-zero
    target) is pushed towards predicting nothing rather than ignored.
    """
    probability = torch.sigmoid(logits)
    soft_dice = 1 - (2 * (probability * target).sum((1, 2, 3)) + 1) / (
        probability.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1
    )
    return nn.functional.binary_cross_entropy_with_logits(logits, target) + soft_dice.mean()


def optimise_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimisation step; returns the loss as a float for logging."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class ScheduleSettings(Protocol):
    """What :func:`scheduled_step` reads of a run's settings."""

    @property
    def learning_rate(self) -> float: ...

    @property
    def epochs(self) -> int: ...

    @property
    def bf16(self) -> bool: ...


@contextlib.contextmanager
def scheduled_step(
    optimizer: torch.optim.Optimizer, config: ScheduleSettings, device: torch.device, position: tuple[int, int, int]
) -> Iterator[None]:
    """The forward pass of one training step as every recipe takes it: the cosine rate set for this step, then the
    block under mixed precision (the loss and :func:`optimise_step` follow outside it, in float).

    ``position`` is (epoch, step within the epoch, steps per epoch); the first epoch's steps are the warm-up.
    """
    epoch, step, steps_per_epoch = position
    cosine_lr(
        optimizer,
        config.learning_rate,
        epoch * steps_per_epoch + step,
        config.epochs * steps_per_epoch,
        steps_per_epoch,
    )
    with mixed_precision(device, config.bf16):
        yield


def epoch_batches(rng: np.random.Generator, count: int, batch_size: int) -> list[npt.NDArray[np.int64]]:
    """One epoch's batches: a fresh permutation of ``count`` items cut into full batches.

    The last partial batch is dropped: a batch of one breaks batch norm on 1x1 feature maps.
    """
    order = rng.permutation(count)
    return [order[step * batch_size : (step + 1) * batch_size] for step in range(max(1, count // batch_size))]


def cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int) -> None:
    """Linear warm-up then cosine decay; groups with their own ``base_lr`` keep their ratio to ``base``."""
    lr = (
        base * (step + 1) / warmup
        if step < warmup
        else base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    )
    for group in optimizer.param_groups:
        group["lr"] = lr * float(group.get("base_lr", base)) / base


def check_resumable(work: Path, settings: dict[str, object], defining: tuple[str, ...]) -> None:
    """Refuse to resume the run in ``work`` if it was started with other values of the ``defining`` settings.

    A run resumes from ``work/last.pt``; its ``config.json`` holds the
    settings it was started with. Resuming under other ones would export
    the old weights described by the new settings.

    Raises
    ------
    TrainingError
        Naming each differing setting, old and new, and how to start afresh.
    """
    saved, checkpoint = work / "config.json", work / "last.pt"
    if not (saved.is_file() and checkpoint.is_file()):
        return
    before = json.loads(saved.read_text())
    changed = [
        f"{name}: {before[name]!r} -> {settings[name]!r}"
        for name in defining
        if name in before and name in settings and before[name] != settings[name]
    ]
    if changed:
        raise TrainingError(
            f"{work} holds a run started with other settings ({'; '.join(changed)}); resuming it would export its "
            f"weights "
            "under the new ones. Remove that folder or pass another --work."
        )


def begin_run(
    config: RunSettings,
    defining: tuple[str, ...] | None = None,
    notes: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """How every training command starts: threads, seeds, the resumability check, the run folder and its config.json.

    ``defining`` names the settings a resumed run must share with the run
    that made the folder (:func:`check_resumable`; None: no check).
    ``notes`` is written beside the settings (a family recipe's notes).
    ``extra`` joins the run's settings (checked and saved with them: a
    cross-validation fold's fold count and the findings it trains on).

    Raises
    ------
    TrainingError
        If the folder holds a run started under other defining settings.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    work = Path(config.work)
    settings = {**dataclasses.asdict(config), **(extra or {})}
    if defining is not None:
        check_resumable(work, settings, defining)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps({**settings, **({"notes": notes} if notes else {})}, indent=2))
    return work


class Checkpoints:
    """Resume-able training state in ``work``: last.pt every epoch, best.pt on improvement.

    ``companions`` are modules trained beside the network but not part of
    what ``best.pt`` exports (a mask decoder, a projection head, auxiliary
    heads): their weights go into ``last.pt`` with the network's and the
    optimiser's, in one file, so a resumed run never pairs optimiser state
    with weights from another epoch or with freshly initialised heads.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)

    def log(self, entry: dict[str, object]) -> None:
        with (self.work / "train.log").open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        companions: Mapping[str, nn.Module] | None = None,
        legacy_files: Mapping[str, str] | None = None,
    ) -> tuple[int, float]:
        """Load ``last.pt`` into ``model``, ``optimizer`` and ``companions``; (first epoch to run, best score so far).

        ``legacy_files`` names, per companion, the file in ``work`` where
        earlier versions kept its weights beside ``last.pt``; it is read
        where ``last.pt`` has none, so their runs still resume.

        Raises
        ------
        TrainingError
            ``last.pt`` lacks a companion's weights (written by a version that
            did not keep them): resuming would train it from random weights
            with the optimiser state of trained ones.
        """
        last = self.work / "last.pt"
        if not last.is_file():
            return 0, -1.0
        state = torch.load(last, map_location="cpu", weights_only=False)
        saved = dict(state.get("companions", {}))
        for name, file in (legacy_files or {}).items():
            if name not in saved and (self.work / file).is_file():
                saved[name] = torch.load(self.work / file, map_location="cpu", weights_only=True)
        missing = sorted(set(companions or {}) - set(saved))
        if missing:
            raise TrainingError(
                f"{last} holds no weights for {', '.join(missing)}; remove {self.work} to start this run afresh"
            )
        model.load_state_dict(state["model"])
        for name, module in (companions or {}).items():
            module.load_state_dict(saved[name])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["epoch"]) + 1, float(state["best"])

    def end_epoch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        losses: list[float],
        metric: str,
        score: float,
        best: float,
        began: float,
        config: RunLimits,
        companions: Mapping[str, nn.Module] | None = None,
    ) -> tuple[float, bool]:
        """Checkpoint, log one JSON line, and say whether the time budget is spent."""
        best = self.save(model, optimizer, epoch, score, best, companions)
        minutes = (time.monotonic() - began) / 60
        self.log(
            {
                "part": config.part,
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                metric: score,
                "best": best,
                "minutes": minutes,
            }
        )
        if minutes > config.max_minutes:
            self.log({"part": config.part, "stopped": "max_minutes reached", "epoch": epoch})
            return best, True
        return best, False

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        score: float,
        best: float,
        companions: Mapping[str, nn.Module] | None = None,
    ) -> float:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "best": max(best, score),
            "companions": {name: module.state_dict() for name, module in (companions or {}).items()},
        }
        torch.save(state, self.work / "last.tmp")
        (self.work / "last.tmp").replace(self.work / "last.pt")
        if score > best:
            torch.save({"model": model.state_dict(), "epoch": epoch, "score": score}, self.work / "best.pt")
            return score
        return best


@dataclass(frozen=True)
class FinishedRun:
    """What an export reads of a finished training run's folder."""

    best: dict[str, Any]  # best.pt: the chosen epoch's checkpoint
    last: dict[str, Any]  # last.pt: where training stopped
    config: dict[str, Any]  # config.json: the run's settings
    log: list[dict[str, Any]]  # train.log: one record per line


def finished_run(work: Path) -> FinishedRun:
    """Read ``work``'s checkpoints, settings and log for an export.

    Raises
    ------
    TrainingError
        The run has no ``best.pt`` (it was never trained).
    """
    if not (work / "best.pt").is_file():
        raise TrainingError(f"{work} holds no best.pt: train the network first (--stage network)")
    return FinishedRun(
        best=torch.load(work / "best.pt", map_location="cpu", weights_only=False),
        last=torch.load(work / "last.pt", map_location="cpu", weights_only=False),
        config=json.loads((work / "config.json").read_text()),
        log=[json.loads(line) for line in (work / "train.log").read_text().splitlines() if line.strip()],
    )
