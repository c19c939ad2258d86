"""What the model cards of DL-UM's branches (DL-U, DL-U on LH, DL-M) say beyond the numbers.

Read by :func:`models.evaluation.cards.card_markdown` through :func:`models.families.catalogue.card_texts`.
"""

from __future__ import annotations

TEXT: dict[str, dict[str, str]] = {
    "dl_u": {
        "paper": "Xu et al., 2025 (DL-UM, ultrasound branch DL-U)",
        "architecture": (
            "VGG19-style branch: blocks of 2, 2, 4, 4, 4 convolutions, BN + ReLU after each block's last convolution, "
            "max-pool after blocks 1-4; deep supervision heads (GAP -> FC64 -> FC1) after every block; focal loss on "
            "all heads. CAM of the block-5 head, exact (affine head)."
        ),
        "deviations": (
            "Quarter-width filters (16..128) and 96 px input for the CPU budget; from scratch. ROI grown by 30 % of "
            "its shortest side on every side (the paper's 'expanded by 30% of their shortest lengths' could also mean "
            "30 % in all), min-max normalised, as the paper. AdamW at 1e-3 (weight decay 1e-4, one-epoch warm-up, "
            "cosine decay) instead of the paper's Adam at 1e-4; focal loss with alpha 0.25, gamma 2 (the paper gives "
            "neither) on class-balanced batches; the checkpoint is chosen by validation AUC, not the lowest "
            "validation loss; one train/validation/test split instead of the paper's five-fold cross-validation. The "
            "served CAM is block 5's only (the paper shows one per block)."
        ),
        "limits": (
            "The fused DL-UM network needs paired US and MG of the same lesion; no public set has them, so only the "
            "branches are trained."
        ),
    },
    "dl_u_lh": {
        "paper": "Xu et al., 2025 (DL-UM's ultrasound branch) on the task of Lu et al., QIMS 2025 (DLR_LH)",
        "architecture": (
            "DL-U's network and recipe (VGG19-style branch, deep supervision, focal loss, CAM of the block-5 head), "
            "trained on DLR_LH's labels: BI-RADS 2/3 (0) vs 4/5 (1) from BUS-BRA and BrEaST. It serves as a member of "
            "the LH consensus (`consensus_lh`), beside DLR_LH, whose mean the 4A co-decision reads."
        ),
        "deviations": (
            "Neither paper trains this model: DL-UM classifies benign vs malignant, and Lu et al. read LH from DLR_LH "
            "alone. It is here because a second LH network of another architecture, averaged with DLR_LH, ranked "
            "validation lesions better than DLR_LH alone or two DLR_LH seeds (`docs/history.md`). DL-U's own "
            "deviations from its paper apply (quarter width, 96 px, AdamW at 1e-3, focal alpha 0.25 and gamma 2, the "
            "checkpoint by validation AUC, one split)."
        ),
        "limits": (
            "Learns the *assessed* BI-RADS category (2/3 vs 4/5) as the radiologists of BUS-BRA and BrEaST assigned "
            "it, not pathology."
        ),
    },
    "dl_m": {
        "paper": "Xu et al., 2025 (DL-UM, mammography branch DL-M)",
        "architecture": "As DL-U, on mammography patches.",
        "deviations": (
            "Trained on mini-MIAS finding patches (square around the listed centre and radius; digitised film, 400 um "
            "pixels): about 60 training findings. Network, loss, optimiser, ROI rule and checkpoint choice as DL-U, "
            "with the deviations from the paper its card lists (quarter width, 96 px, AdamW at 1e-3, focal alpha 0.25 "
            "and gamma 2, the checkpoint by validation AUC, one split instead of five-fold cross-validation)."
        ),
        "limits": (
            "Very small data; not validated on digital mammography; MG studies are not yet routed to this model by "
            "the service."
        ),
    },
}
