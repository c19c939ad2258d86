"""DL-UM's branches as trained here: DL-U (ultrasound), DL-M (mini-MIAS patches) and DL-U on DLR_LH's task."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.families.dlum.network import BranchExportWrapper, DLUMBranch, branch_loss
from models.families.spec import BIRADS_DATASETS, DLUM_ROI, US_DATASETS, FamilySpec

Tensor = torch.Tensor
WIDTH = 0.25  # of the paper's filters (16..128): the CPU budget (the card's deviations)


def deep_supervision(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Focal loss on every block's head (the paper's deep supervision)."""
    block_logits = model(x)[0]
    return branch_loss(block_logits, y)


def branch_positive(model: nn.Module, x: Tensor) -> Tensor:
    """P(positive) of the last block's head, the one served."""
    return torch.sigmoid(model(x)[0][:, -1])


def serving_graph(model: nn.Module, _work: Path) -> tuple[nn.Module, list[str], list[str]]:
    """The last head's logit, every block's logits and the CAM of the block-5 head."""
    assert isinstance(model, DLUMBranch)
    return BranchExportWrapper(model), ["image"], ["logit", "block_logits", "cam"]


def _branch() -> nn.Module:
    return DLUMBranch(width=WIDTH)


SPECS = (
    FamilySpec(
        "dl_u",
        "BreastAI-DL-U-VGG19style",
        "malignancy",
        US_DATASETS,
        _branch,
        deep_supervision,
        branch_positive,
        serving_graph,
        DLUM_ROI,
        epochs=40,
        batch_size=16,
        learning_rate=1e-3,
        input_size=96,
        version="0.5.0",
        notes="DL-UM ultrasound branch, focal loss on all five block heads",
    ),
    FamilySpec(
        "dl_u_lh",
        "BreastAI-DL-U-LH-VGG19style",
        "birads_high",
        BIRADS_DATASETS,
        _branch,
        deep_supervision,
        branch_positive,
        serving_graph,
        DLUM_ROI,
        epochs=40,
        batch_size=16,
        learning_rate=1e-3,
        input_size=96,
        ensemble=2,
        version="0.1.0",
        notes=(
            "DL-U's network and recipe on DLR_LH's task (BI-RADS 2/3 vs 4/5): a second LH member beside DLR_LH, two "
            "seeds"
        ),
    ),
    FamilySpec(
        "dl_m",
        "BreastAI-DL-M-VGG19style",
        "malignancy",
        ("mias",),
        _branch,
        deep_supervision,
        branch_positive,
        serving_graph,
        DLUM_ROI,
        epochs=30,
        batch_size=16,
        learning_rate=1e-3,
        input_size=96,
        version="0.2.0",
        notes="DL-UM mammography branch on mini-MIAS finding patches (circle around the listed centre and radius)",
    ),
)
