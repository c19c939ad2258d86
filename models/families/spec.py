"""What a paper family declares about itself: its network, losses, ROI rule, recipe settings and serving graph.

Each family folder's ``recipe.py`` builds one :class:`FamilySpec` per model it
trains (``SPECS``); :mod:`models.families.catalogue` finds them, and the
generic loop in :mod:`models.training` trains, finishes and exports any of
them. Nothing here imports ``models.training``: the loop depends on the
families, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional

from models.datasets import BIRADS_DATASETS as BIRADS_DATASETS  # re-exported for the recipes
from models.datasets import US_DATASETS as US_DATASETS
from models.families.finish_run import FinishRecord, FinishStage, ServedScores
from models.inference.manifest import Normalisation
from models.inference.preprocess import Box, roi_box, roi_tensor

Tensor = torch.Tensor

#: The seed every bundled model was trained from unless its recipe names another (:attr:`FamilySpec.seed`); the
#: segmenter and refiner use it too, and every manifest records the seed it ran.
DEFAULT_SEED = 20261121

#: A family's serving graph built from its trained network and run folder: (graph, input names, output names).
ServingGraph = Callable[[nn.Module, Path], tuple[nn.Module, list[str], list[str]]]


@dataclass(frozen=True)
class RoiStyle:
    """How a family cuts and normalises its ROI: the papers differ.

    The same rule cuts training, validation, export and serving inputs: these
    methods and :class:`models.inference.family_scorer.FamilyScorer` both call
    :func:`models.inference.preprocess.roi_box` and
    :func:`~models.inference.preprocess.roi_tensor`; serving reads the settings
    back from the manifest (``roi_normalisation``, ``roi_expand``,
    ``roi_expand_shortest_side``).
    """

    normalisation: Normalisation  # ZSCORE (per-ROI standardisation) or MINMAX (DL-UM: [0, 1])
    padding: float  # box growth on every side, as a fraction of the box (or of its shortest side)
    shortest_side: bool  # DL-UM grows by a fraction of the shortest side

    def box(self, box: Box, shape: tuple[int, int], padding: float | None = None) -> Box:
        """The lesion box grown by ``padding`` (default: the family's) and clipped to the image."""
        return roi_box(box, shape, self.padding if padding is None else padding, self.shortest_side)

    def tensor(self, roi: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
        """The network input of one cut ROI: (1, 1, size, size) float32."""
        return roi_tensor(roi, self.normalisation, size)


ZSCORE_ROI = RoiStyle(Normalisation.ZSCORE, 0.2, False)
DLUM_ROI = RoiStyle(Normalisation.MINMAX, 0.3, True)


@dataclass(frozen=True)
class FamilySpec:
    """Everything the generic loop needs to know about one trainable model of a family."""

    name: str  # the manifest role and the name `breastai train` takes
    model_name: str  # the algorithm name the SR reports (TID 4019)
    task: str  # "malignancy" or "birads_high"
    datasets: tuple[str, ...]
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    positive_probability: Callable[[nn.Module, Tensor], Tensor]
    serving_graph: ServingGraph
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
    # What the paper adds after the network (DLR's age MLP, CLDLR's SVMs, MUP-Net's projection), in the family's
    # finish.py; the training loop runs it with the tools of models.families.finish_run.FinishRun. None: nothing.
    finish: FinishStage | None = None
    served_scores: ServedScores | None = None  # where the served score is not the graph's first output (CLDLR)
    finish_record: FinishRecord | None = None  # what the manifest records of the finish stage (MUP-Net's cycles)
    # Files of the run folder the export copies beside the graph: (file in the run folder, side-file key).
    side_files: tuple[tuple[str, str], ...] = ()
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = (
        None  # default: AdamW over trainable parameters
    )
    push_cycles: int = 1  # MUP-Net: how many times its projection and last-layer stages run (the paper repeats them)
    push_epochs: int = 0  # MUP-Net: joint epochs before each projection after the first
    # Export: store large convolution weights as int8 when what is served stays within tolerance. Set for the two
    # ResNet-50s, which are 47.5 MB each in fp16 against a 150 MB budget for every bundled weight.
    int8_weights: bool = False
    ensemble: int = 1  # seed-ensemble members the recipe trains (RunConfig.ensemble)
    # The seed the shipped model was trained from (its mask pretraining's too), so that `make train-FAMILY` rebuilds
    # that run and not a sibling of it; a recipe whose shipped run was chosen among seeds names the one it shipped.
    seed: int = DEFAULT_SEED
    # Epochs of the mask pretraining the recipe starts from (models.training.mask_pretraining; chosen on validation
    # AUC as served, docs/history.md); None: the recipe starts from random weights.
    mask_pretraining_epochs: int | None = None

    @property
    def modality(self) -> str:
        """The modality the model reads: mammography for the mini-MIAS recipes, else ultrasound."""
        return "MG" if self.datasets == ("mias",) else "US"


def softmax_cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of a network whose first output is two-class logits (DLR, CLDLR)."""
    logits = model(x)[0]
    return functional.cross_entropy(logits, y)


def softmax_positive(model: nn.Module, x: Tensor) -> Tensor:
    """P(positive) of a network whose first output is two-class logits."""
    return torch.softmax(model(x)[0], dim=1)[:, 1]
