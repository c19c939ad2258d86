"""DL-UM (Xu et al., 2025): VGG19-style ultrasound and mammography branches with deep supervision (DL-U, DL-M)."""
