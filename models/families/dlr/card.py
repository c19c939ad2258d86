"""What the model cards of DLR_LH and DLR_BM say beyond the numbers.

Read by :func:`models.evaluation.cards.card_markdown` through :func:`models.families.catalogue.card_texts`.
"""

from __future__ import annotations

TEXT: dict[str, dict[str, str]] = {
    "dlr_lh": {
        "paper": "Lu et al., QIMS 2025 (DLR_LH)",
        "architecture": (
            "ResNet-50 (standard 7x7 stride-2 stem), FC replaced by FC-128 (embedding) + FC-2; MLP over [embedding, "
            "age/100, age-known]. Grad-CAM of the log-odds on the last stage, in closed form inside the graph."
        ),
        "deviations": (
            "128 px ROI input instead of 224 px (CPU budget); AdamW with warm-up and cosine decay; trained from "
            "scratch; class-balanced sampling. ROI: the largest lesion region's box grown by 20 % per side. Grad-CAM "
            "explains the image head (FC-2), not the age MLP that gives the served score. BUS-BRA carries no age, so "
            "most training cases have the age flag at 0. One train/validation/test split with the checkpoint chosen "
            "by validation AUC instead of the paper's five-fold cross-validation. Where the paper gives no detail: a "
            "ReLU between FC-128 and FC-2, and an age MLP of 64 hidden units with dropout 0.2. The 4A co-decision "
            "calls LH high (and BM malignant) at each model's operating point (Youden on validation lesions), where "
            "the paper uses each model's predicted class."
        ),
        "limits": (
            "Learns the *assessed* BI-RADS category (2/3 vs 4/5) as the radiologists of BUS-BRA and BrEaST assigned "
            "it, not pathology."
        ),
    },
    "dlr_bm": {
        "paper": "Lu et al., QIMS 2025 (DLR_BM)",
        "architecture": "As DLR_LH (ResNet-50, FC-128 + FC-2, age MLP), trained on benign vs malignant.",
        "deviations": (
            "None in the data rule, though BUSI's labels are not all biopsy-proven where the paper's are: as the "
            "paper's data_BM (every case with a pathology result, not only BI-RADS 4A ones; the summary of the papers "
            "this project started from says 'within BI-RADS 4A', which is where the paper applies the co-decision), "
            "BM is trained on every US lesion with a pathology label. The 4A co-decision is tallied on BrEaST's 4A "
            "cases (34 lesions), the only public ones. It calls a lesion malignant at BM's operating point (Youden on "
            "validation lesions of every category, not the predicted class the paper uses), which calls few 4A "
            "lesions benign, so downgrades are rarer than the paper's. One split instead of five-fold "
            "cross-validation, and the head and age MLP, as DLR_LH. 128 px input; no ImageNet weights (see "
            "Initialisation); ROI and Grad-CAM as DLR_LH."
        ),
        "limits": "BUSI labels are not all biopsy-proven. Co-decision counts on public 4A cases are small.",
    },
}
