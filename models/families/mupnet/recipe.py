"""MUP-Net as trained here: one modality (B-mode), ResNet-18 trunk, 10 prototypes; projection and last-layer cycles
in its finish stage (finish.py)."""

from __future__ import annotations

import torch
from torch import nn

from models.families.mupnet import network as mupnet
from models.families.mupnet.export import serving_graph
from models.families.mupnet.finish import cycles_record, finish_prototypes
from models.families.spec import US_DATASETS, ZSCORE_ROI, FamilySpec

Tensor = torch.Tensor


def mupnet_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy with the prototype costs of eq. (4)-(5) (:func:`models.families.mupnet.network.mupnet_loss`)."""
    assert isinstance(model, mupnet.MUPNet)
    return mupnet.mupnet_loss(model, model(x[:, None]), y).total


def mupnet_positive(model: nn.Module, x: Tensor) -> Tensor:
    """P(malignant) of a batch of single-modality ROIs."""
    return torch.softmax(model(x[:, None]).logits, dim=1)[:, 1]


def joint_stage_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Stage 1 of the paper: trunks, add-on layers and prototypes; the last layer stays frozen."""
    assert isinstance(model, mupnet.MUPNet)
    mupnet.set_trainable(model, "joint")
    return mupnet.joint_optimizer(model)


def _one_modality() -> nn.Module:
    return mupnet.MUPNet(modalities=1)


SPECS = (
    FamilySpec(
        "mupnet",
        "BreastAI-MUP-Net-ResNet18-Bmode",
        "malignancy",
        US_DATASETS,
        _one_modality,
        mupnet_loss,
        mupnet_positive,
        serving_graph,
        ZSCORE_ROI,
        epochs=10,
        batch_size=16,
        learning_rate=2e-4,
        input_size=128,
        optimizer=joint_stage_optimizer,
        push_cycles=3,
        push_epochs=5,
        version="0.7.0",
        mask_pretraining_epochs=20,
        finish=finish_prototypes,
        finish_record=cycles_record,
        side_files=(("prototype_patches.npz", "prototype_patches"), ("prototypes.json", "prototypes")),
        notes="MUP-Net with M = 1 (B-mode): no public Doppler or elastography set exists",
    ),
)
