"""What a family's finish stage is given: the trained network's run, and the training tools it may use.

A paper often adds a stage after its network (DLR's age MLP, CLDLR's SVMs,
MUP-Net's prototype projection). That stage belongs to the family's folder,
but it needs the training loop's tools (the best checkpoint, serving-style
ROI inputs, augmented balanced batches, the device and the precision the
network trained in). :class:`FinishRun` names exactly those; the training
loop implements it (``models.training.finish.TrainingFinishRun``), so the
families never import ``models.training``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.datasets import Record
from models.inference.preprocess import Box


class Lesion(Protocol):
    """One training lesion: the record it came from, the full image, its ground-truth box and its label."""

    @property
    def record(self) -> Record: ...

    @property
    def image(self) -> npt.NDArray[np.uint8]: ...

    @property
    def box(self) -> Box: ...

    @property
    def label(self) -> int: ...


class BatchSource(Protocol):
    """Augmented, class-balanced training batches (what the network stage trained on)."""

    @property
    def steps_per_epoch(self) -> int: ...

    def draw(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.int64], torch.Tensor, torch.Tensor]: ...


class FinishRun(Protocol):
    """The run a finish stage completes: its settings, and the training tools it may use."""

    @property
    def name(self) -> str:
        """The family model's name (its manifest role)."""
        ...

    @property
    def work(self) -> Path:
        """The run folder: the network stage's checkpoints are here, and the stage writes its files here."""
        ...

    @property
    def seed(self) -> int: ...

    @property
    def push_cycles(self) -> int: ...

    @property
    def push_epochs(self) -> int: ...

    def best_network(self) -> nn.Module:
        """The network at its best validation epoch, in eval mode, on the CPU."""
        ...

    def on_training_device(self, model: nn.Module) -> nn.Module:
        """``model`` moved to the device the run trains on (a GPU where there is one)."""
        ...

    def precision(self) -> AbstractContextManager[Any]:
        """The autocast the network stage trained under (bfloat16 with ``--bf16``), to enter around forward passes."""
        ...

    def roi_inputs(self, lesions: Sequence[Lesion]) -> npt.NDArray[np.float32]:
        """Serving-style network inputs of ``lesions``: (N, 1, size, size)."""
        ...

    def network_outputs(self, model: nn.Module, lesions: Sequence[Lesion]) -> npt.NDArray[np.float32]:
        """The network's second output (DLR's embedding, CLDLR's deep features) for every lesion."""
        ...

    def balanced_batches(self, lesions: Sequence[Lesion]) -> BatchSource:
        """Augmented training batches of ``lesions``, both classes equally often."""
        ...

    def optimise_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
        """One optimiser step on ``loss``; its value."""
        ...

    def auc(self, labels: Sequence[int] | npt.NDArray[Any], scores: Sequence[float] | npt.NDArray[Any]) -> float:
        """ROC AUC, the statistic every stage chooses its best epoch by."""
        ...


#: A finish stage: the run it completes and its lesions by split ("train", "val"); returns a summary for finish.json.
FinishStage = Callable[[FinishRun, Mapping[str, Sequence[Lesion]]], dict[str, Any]]
#: The served score of each validation lesion where it is not the graph's first output (CLDLR's SVM): given the
#: exported graph's named output on those lesions, the exported side files by key, and the lesions.
ServedScores = Callable[[Callable[[str], list[npt.NDArray[Any]]], Mapping[str, Path], Sequence[Lesion]], list[float]]
#: What the export records in the manifest's training record from the finish stage's summary (finish.json).
FinishRecord = Callable[[Mapping[str, Any]], dict[str, Any]]
