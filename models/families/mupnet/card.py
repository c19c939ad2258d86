"""What the model cards of MUP-Net say beyond the numbers.

Read by :func:`models.evaluation.cards.card_markdown` through :func:`models.families.catalogue.card_texts`.
"""

from __future__ import annotations

TEXT: dict[str, dict[str, str]] = {
    "mupnet": {
        "paper": "Yan et al., Commun Med 2024 (MUP-Net)",
        "architecture": (
            "ResNet-18 backbone per modality (M = 1 here: B-mode), 10 prototypes (5 per class), log similarity with "
            "top-k pooling, class-connected last layer (+1 / -0.5); stages, repeated as in the paper: joint training, "
            "projection onto an own-class training patch (BI-RADS 2/3/4a benign, 4c/5 malignant candidates), "
            "last-layer training; three cycles, the best on validation kept. Explanation: each prototype's share of "
            "the malignancy log-odds and the prototype patches (side files)."
        ),
        "deviations": (
            "M = 1: no public colour-Doppler or elastography set exists (M = 3 is implemented and unit-tested only). "
            "128 px input; no ImageNet weights (see Initialisation); no warm-up epochs (`--warm-epochs 5` before the "
            "10 joint epochs was tried on the mask-pretrained trunk: 0.885 on validation as served, against 0.897 "
            "without). The stages repeat three times in all (10 joint epochs, then twice 5 joint epochs at a tenth of "
            "the rates before projecting again), not through the paper's 80 epochs. Each prototype is projected onto "
            "a different training image, the nearest one not already taken by a nearer prototype; the paper projects "
            "each onto its nearest patch independently, which can show the same patch twice. Loss: CE + 0.8 "
            "clustering - 0.08 separation + 1e-4 L1 on the cross-class weights: ProtoPNet's weights, whose procedure "
            "the paper says it follows (refs. 33, 34); its eq. (6) as printed puts 0.8 on separation and -0.08 on "
            "clustering, which would push each patch away from its own class's prototypes (eq. (4), the clustering "
            "loss, taken with -0.08). Add-on layers between trunk and prototypes (1x1 conv, ReLU, 1x1 conv, sigmoid; "
            "512 channels), which the paper does not describe. Batch 16 instead of 40; weight decay 1e-3 on every "
            "trunk and add-on weight, not only the batch-norm parameters; augmentation by box jitter, flip, gamma and "
            "speckle with class-balanced batches, where the paper uses flips, brightness and contrast of 0.9-1.1, "
            "0.9-1 crops and rotations of up to 10 degrees with oversampled malignant cases; each last-layer stage "
            "runs 8 epochs and keeps its best validation epoch. Top-k pooling takes 5 of the 16 positions of the 4x4 "
            "latent map. BI-RADS 2 is admitted among the benign prototype candidates (the paper: 3/4a). Contributions "
            "are each prototype's share of the malignancy log-odds (similarity x (malignant weight - benign weight)), "
            "which sum to the log-odds the probability is made of, not normalised per class as in the paper's "
            "figures. Adam with per-part rates, cosine decay over the first 10 joint epochs and a tenth of the rates "
            "for the 10 between projections: 20 joint epochs in all instead of the paper's 80 at 0.001 cut by 90 % "
            "every 5 epochs."
        ),
        "limits": "BUSI images carry no BI-RADS and so are never prototypes.",
    },
}
