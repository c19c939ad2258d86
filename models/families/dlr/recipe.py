"""DLR_LH and DLR_BM as trained here: ResNet-50 on 128 px ROIs, then the paper's age MLP (finish.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.families.dlr.finish import finish_age_mlp
from models.families.dlr.network import AgeFusionMLP, DLRExportWrapper, DLRNet
from models.families.spec import (
    BIRADS_DATASETS,
    US_DATASETS,
    ZSCORE_ROI,
    FamilySpec,
    softmax_cross_entropy,
    softmax_positive,
)


def serving_graph(model: nn.Module, work: Path) -> tuple[nn.Module, list[str], list[str]]:
    """The network with the finish stage's age MLP (``mlp.pt``): inputs image and clinical."""
    mlp = AgeFusionMLP()
    mlp.load_state_dict(torch.load(work / "mlp.pt", map_location="cpu", weights_only=False))
    assert isinstance(model, DLRNet)
    return DLRExportWrapper(model, mlp.eval()), ["image", "clinical"], ["logits", "image_logits", "cam"]


def _resnet50() -> nn.Module:
    return DLRNet(depth=50)


SPECS = (
    FamilySpec(
        "dlr_lh",
        "BreastAI-DLR_LH-ResNet50",
        "birads_high",
        BIRADS_DATASETS,
        _resnet50,
        softmax_cross_entropy,
        softmax_positive,
        serving_graph,
        ZSCORE_ROI,
        epochs=30,
        batch_size=16,
        learning_rate=1e-3,
        input_size=128,
        int8_weights=True,
        version="0.3.0",
        finish=finish_age_mlp,
        notes="BI-RADS 2/3 (0) vs 4/5 (1) from BUS-BRA and BrEaST (their assessed categories)",
    ),
    FamilySpec(
        "dlr_bm",
        "BreastAI-DLR_BM-ResNet50",
        "malignancy",
        US_DATASETS,
        _resnet50,
        softmax_cross_entropy,
        softmax_positive,
        serving_graph,
        ZSCORE_ROI,
        epochs=20,
        batch_size=16,
        learning_rate=1e-3,
        input_size=128,
        int8_weights=True,
        version="0.8.0",
        mask_pretraining_epochs=12,
        seed=20261122,
        finish=finish_age_mlp,
        notes="benign (0) vs malignant (1) over every US lesion with a pathology label",
    ),
)
