"""What the model cards of CLDLR say beyond the numbers.

Read by :func:`models.evaluation.cards.card_markdown` through :func:`models.families.catalogue.card_texts`.
"""

from __future__ import annotations

TEXT: dict[str, dict[str, str]] = {
    "cldlr": {
        "paper": "Yang et al., Sci Rep 2024 (CLDLR)",
        "architecture": (
            "VGG11 (configuration A, batch norm) -> GAP -> FC-512 -> FC-512 -> FC-2; deep features from the "
            "penultimate FC; RBF SVMs on clinical only, DLR only, and DLR + clinical (served), Platt-scaled on "
            "validation data."
        ),
        "deviations": (
            "GAP + 512-wide FC layers instead of flatten + 4096 (weights and CPU budget; makes Grad-CAM exact in "
            "closed form); half-width convolutions; 128 px input; no ImageNet weights (see Initialisation). Clinical "
            "variables limited to what DICOM carries (age, maximum lesion diameter from the box and pixel spacing); "
            "only BrEaST has them in training, so the clinical-only SVM is weak by construction. The paper selects "
            "BI-RADS 4 lesions only; here every lesion with a pathology label trains and is scored. VGG11 with batch "
            "norm. ROI: the mask's box grown by 20 % per side (the paper: the mask's rectangle). Training: AdamW at "
            "5e-4 (weight decay 1e-4) with a one-epoch warm-up and cosine decay over 10 epochs, class-balanced "
            "batches, the checkpoint chosen by validation AUC, after mask pretraining (see Initialisation); the paper "
            "trains with Adam at 0.005 for 200 epochs, batch 16."
        ),
        "limits": (
            "Menopause, margin, calcification, posterior features and Doppler flow of the paper are not available "
            "from DICOM and are not used."
        ),
    },
}
