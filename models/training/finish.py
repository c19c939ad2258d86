"""The finish stage: what a paper adds after its network, run with the training loop's tools.

The stage itself lives in the family's folder (``FamilySpec.finish``, e.g.
:func:`models.families.cldlr.finish.finish_svms`); :class:`TrainingFinishRun`
gives it what :class:`models.families.finish_run.FinishRun` promises. Its
summary goes to the run folder's ``finish.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.errors import TrainingError
from models.evaluation.stats import auc
from models.families.finish_run import Lesion
from models.families.spec import FamilySpec
from models.training.loop import mixed_precision, optimise_step, to_training_device, training_device
from models.training.run_config import RunConfig
from models.training.samples import (
    BalancedBatches,
    LesionSample,
    evaluation_input,
    load_best,
    network_outputs,
)


@dataclass(frozen=True)
class TrainingFinishRun:
    """A finished network stage's run, with the tools a family's finish stage may use (FinishRun)."""

    spec: FamilySpec
    config: RunConfig

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def work(self) -> Path:
        return Path(self.config.work)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def push_cycles(self) -> int:
        return self.config.push_cycles

    @property
    def push_epochs(self) -> int:
        return self.config.push_epochs

    def best_network(self) -> nn.Module:
        return load_best(self.spec, self.work)

    def on_training_device(self, model: nn.Module) -> nn.Module:
        return to_training_device(model, training_device(self.config.device))

    def precision(self) -> AbstractContextManager[Any]:
        return mixed_precision(training_device(self.config.device), self.config.bf16)

    def roi_inputs(self, lesions: Sequence[Lesion]) -> npt.NDArray[np.float32]:
        return np.concatenate([evaluation_input(self.spec.roi, s, self.config.input_size) for s in lesions])

    def network_outputs(self, model: nn.Module, lesions: Sequence[Lesion]) -> npt.NDArray[np.float32]:
        return network_outputs(self.spec, model, list(lesions), self.config.input_size)

    def balanced_batches(self, lesions: Sequence[Lesion]) -> BalancedBatches:
        return BalancedBatches(self.spec, list(lesions), self.config.batch_size, self.config.input_size)

    def optimise_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
        return optimise_step(optimizer, loss)

    def auc(self, labels: Sequence[int] | npt.NDArray[Any], scores: Sequence[float] | npt.NDArray[Any]) -> float:
        return auc(labels, scores)


def run_finish(spec: FamilySpec, config: RunConfig, samples: Mapping[str, list[LesionSample]]) -> dict[str, Any]:
    """Run ``spec``'s finish stage on the run in ``config.work``; write and return its summary (``finish.json``).

    Raises
    ------
    TrainingError
        If the recipe has no finish stage.
    """
    if spec.finish is None:
        raise TrainingError(f"{spec.name} has no finish stage")
    summary = spec.finish(TrainingFinishRun(spec, config), samples)
    (Path(config.work) / "finish.json").write_text(json.dumps(summary, indent=2))
    return summary
