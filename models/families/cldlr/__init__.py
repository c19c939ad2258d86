"""CLDLR (Yang et al., Sci Rep 2024): VGG11 deep features with clinical variables, classified by an SVM."""
