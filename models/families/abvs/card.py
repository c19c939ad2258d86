"""What the ABVS three-plane model's card says beyond the numbers.

Read by :func:`models.evaluation.three_plane.three_plane_card` through :func:`models.families.catalogue.card_texts`.
"""

from __future__ import annotations

TEXT: dict[str, dict[str, str]] = {
    "abvs_three_plane": {
        "paper": "Liu et al., Theranostics 2025 (ABVS three-plane)",
        "volumes": (
            "**Every volume is a construction, not ABVS data.** No public labelled ABVS (automated breast volume "
            "scanner) data set exists, so each volume is built from one real 2-D B-mode image and its lesion mask "
            "(BUS-BRA, BUSI, BrEaST; `models/training/abvs_volumes.py`, `build_volume`):\n\n"
            "1. The image and mask are shrunk to 128 px on their long side. The volume has 48 transverse slices "
            "along the sweep axis; the central one is the real image, unchanged.\n"
            "2. Each lesion (connected component of the mask) is swept as an ellipsoid: on a slice at distance d "
            "from the centre, its cross-section is the real 2-D lesion (outline and texture) scaled about its "
            "centroid by sqrt(1 - (d/a)^2), a being a random elevational semi-axis of 0.6-1.0 times the lesion's "
            "lateral half-width (at most 23 slices), so the lesion shrinks to nothing at its ends.\n"
            "3. Outside the lesion, every slice shows the surrounding tissue: the real image with the lesion and a "
            "thin rim inpainted away (OpenCV Telea inpainting), drifting slowly sideways along the sweep and smoothly "
            "deformed (a displacement field that changes continuously with the slice and vanishes at the centre).\n"
            "4. Every slice but the central one gets fresh multiplicative log-normal speckle (sigma 0.12).\n"
            "5. The sagittal plane (rows depth, columns sweep) and the coronal plane (rows sweep, columns lateral) "
            "through the centre of the largest lesion of the central slice are then resampled from that volume: "
            "the column and the row through the centre, across all slices.\n\n"
            "The label is the 2-D image's benign/malignant label. Each plane's crop is the box of the largest lesion "
            "component in that plane's slice of the volume's mask (the true mask stands in for the paper's UNet), "
            "grown by 10 % on every side. Training lesions give two volumes each (two seeds: another semi-axis, "
            "drift, deformation and speckle); validation and test lesions one each, built the same way."
        ),
        "architecture": (
            "The paper's fusion (`models/families/abvs/network.py`): one ResNet trunk per plane (transverse, "
            "sagittal, coronal; standard 7x7 stride-2 stem), global average pooling, transverse + sagittal features "
            "added, concatenated with the coronal features, FC to half width, ReLU, FC to 2 (benign, malignant). "
            "Per-frame probabilities are averaged over the lesion's transverse frames (served: 3 frames 2 slices "
            "apart, each with the sagittal and coronal crop through the centre), malignant above 0.5, as in the "
            "paper. Grad-CAM per plane is computed in closed form inside the ONNX graph (outputs `cam_transverse`, "
            "`cam_sagittal`, `cam_coronal`)."
        ),
        "deviations": (
            "ResNet-18 trunks at half width (32-256 channels, 8.5 M weights in all) instead of ResNet-50: three "
            "ResNet-50s hold 70.5 M weights, about 71 MB even as int8, and even at half width trained at a third of "
            "the speed of half-width ResNet-18s on the one shared CPU core available; 96 px crops instead of 224 px "
            "(the volumes come from images shrunk to 128 px, so crops are rarely wider). Trained from scratch (no "
            "ImageNet weights can be had here); AdamW (lr 1e-3, weight decay 1e-4) with a one-epoch warm-up and "
            "cosine decay, batch 16, bfloat16 autocast, class-weighted cross-entropy, instead of SGD with momentum "
            "at lr 0.001 and batch 64. Augmentation: a random transverse frame (5, 2 slices apart) and sagittal / "
            "coronal frame (3) per step, mirror images of the whole volume (lateral, sweep), one gain per lesion "
            "and fresh speckle per plane. The epoch is chosen by the validation split's AUC under the served rule; "
            "one split instead of cross-validation. No UNet per plane: the volume's true mask gives the ROI (a "
            "caller of the served model cuts the crops)."
        ),
        "limits": (
            "- Advisory only, **not a diagnosis, not for clinical use**.\n"
            "- **Not validated on ABVS data.** The held-out figures are measured on volumes built from the test "
            "split's 2-D images, not on any ABVS volume, and say nothing about accuracy on real ABVS studies.\n"
            '- Real ABVS sagittal and coronal appearance is **not reproduced**: the coronal "retraction '
            'phenomenon" (tissue converging on a malignant mass, seen in the coronal plane; the paper credits the '
            "coronal plane's morphological features), posterior features seen across slices, the transducer "
            "geometry, compression, nipple and skin, anisotropic voxels and real lesion shapes along the sweep are "
            "absent. The sagittal and coronal planes are geometric extrapolations of one transverse image, so they "
            "hold no information the transverse image does not; the model can gain nothing genuinely "
            "three-dimensional from them.\n"
            "- A lesion's neighbouring transverse frames are near-copies of the real image (the lesion barely "
            "shrinks 2 slices from the centre), so averaging over frames mostly averages speckle.\n"
            "- Trained on hand-held B-mode lesions of three public sets; a scanner, a population or a lesion mix "
            "unlike theirs may score differently.\n"
            "- Not routed: the service does not send ABVS studies to this model yet (`models/inference/volume.py` "
            "scores ABVS lesions with the 2-D families on their central frame)."
        ),
    },
}
