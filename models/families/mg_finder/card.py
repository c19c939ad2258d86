"""What the mammography lesion finder's model card says beyond the numbers.

Read by :func:`models.evaluation.finder.finder_card` through :func:`models.families.catalogue.card_texts`.
"""

from __future__ import annotations

TEXT: dict[str, dict[str, str]] = {
    "mg_finder": {
        "paper": "the project's own (no paper: Xu et al.'s DL-M needs a lesion box that nothing in the project drew)",
        "architecture": (
            "A fully convolutional heat-map network: MONAI's BasicUNet (the ultrasound refiner's architecture) at half "
            "its width, 8-128 channels over five levels, batch norm, one input channel (the mammogram z-scored over "
            "its tissue at 0.4 mm per pixel) and one logit channel (per-pixel probability that the pixel lies in a "
            "listed abnormality). About 0.49 M parameters; exported in fp32 with free height and width."
        ),
        "deviations": (
            "Targets are filled disks drawn from mini-MIAS's centre and radius (y counted from the bottom edge, at "
            "least 4 px in radius); normal images are all zero; images whose abnormality has no centre are left out "
            "of training. Every image is mirrored to put the chest wall on the left, by the same tissue heuristic "
            "serving uses without a DICOM orientation. Trained from scratch (no pretrained weights can be had here) "
            "on 256 px crops (half of them centred near a listed abnormality, the rest anywhere on tissue) of the "
            "whole standardised image, with up-down flips, rotation +-10 degrees, scale 0.85-1.15, shift, gamma and "
            "multiplicative noise; BCE + soft Dice; AdamW with warm-up and cosine decay; the checkpoint chosen on "
            "the validation split by the mean FROC sensitivity at 0.5, 1 and 2 false positives per image; batch-norm "
            "statistics recomputed on whole training images at export. The probability is the heat map's peak in "
            "the region, not calibrated."
        ),
        "limits": (
            "- Advisory only, **not for diagnostic use**.\n"
            "- mini-MIAS is small (about 60 training images with a located abnormality) and old: digitised film at "
            "400 um loses fine calcifications, and its 20 abnormal test images give wide intervals.\n"
            "- Not validated on full-field digital mammography, tomosynthesis, CC views or implants; a DICOM image is "
            "resampled to 0.4 mm and read as if it were film.\n"
            "- A circle from mini-MIAS is a coarse outline: the regions' outlines and radii are heat-map blobs, not "
            "lesion margins, and must not be used for measurement.\n"
            "- Film labels and markers, the pectoral muscle and dense tissue can draw false positives."
        ),
    },
}
