"""ABVS three-plane family (Liu et al., Theranostics 2025): ResNet-50 per plane, fused; per-frame averaging."""
