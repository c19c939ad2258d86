"""CLDLR as trained here: VGG11 at half width on 128 px ROIs, then the paper's SVMs (its finish stage: finish.py)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from models.families.cldlr.finish import finish_svms, svm_scores
from models.families.cldlr.network import CLDLRExportWrapper, VGG11Radiomics
from models.families.spec import US_DATASETS, ZSCORE_ROI, FamilySpec, softmax_cross_entropy, softmax_positive

WIDTH = 0.5  # of VGG11's filters: the CPU budget (the card's deviations)
#: The SVMs the finish stage fits (clinical only, DLR only, both: the served one), each a side file of the export.
SVM_VARIANTS = ("clinical", "dlr", "cldlr")


def serving_graph(model: nn.Module, _work: Path) -> tuple[nn.Module, list[str], list[str]]:
    """Logits, the deep features the served SVM reads, and the Grad-CAM map."""
    assert isinstance(model, VGG11Radiomics)
    return CLDLRExportWrapper(model), ["image"], ["logits", "deep_features", "cam"]


def _vgg11() -> nn.Module:
    return VGG11Radiomics(width=WIDTH)


SPECS = (
    FamilySpec(
        "cldlr",
        "BreastAI-CLDLR-VGG11-SVM",
        "malignancy",
        US_DATASETS,
        _vgg11,
        softmax_cross_entropy,
        softmax_positive,
        serving_graph,
        ZSCORE_ROI,
        epochs=10,
        batch_size=16,
        learning_rate=5e-4,
        input_size=128,
        version="0.7.0",
        mask_pretraining_epochs=10,
        finish=finish_svms,
        served_scores=svm_scores,
        side_files=tuple((f"svm_{variant}.npz", variant) for variant in SVM_VARIANTS),
        notes="VGG11 feature network; the SVMs are fitted in the finish stage",
    ),
)
