"""MUP-Net (Yan et al., Commun Med 2024): interpretable multimodal prototypes on ResNet-18 trunks."""
