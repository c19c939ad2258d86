"""CLDLR: deep-learning radiomics + clinical variables -> SVM (Yang et al., Sci Rep 2024).

A VGG11 network is trained on lesion ROIs (benign vs malignant); its
penultimate fully connected layer then serves as a feature extractor, and
support vector machines are trained on three feature sets, as the paper
compares them (its Method S1): clinical only, deep features only (DLR) and
both (CLDLR). The SVM's probability is the "AI score".

The PyTorch part here is the VGG11 network and its closed-form Grad-CAM;
the SVM lives in :mod:`models.inference.svm` (plain numpy at serving time).

Deviation, stated in the model card: the paper's VGG11 flattens a 7x7x512
map into FC-4096 layers (about 120 M parameters). Here the last map is
globally average-pooled and the two FC layers are ``hidden`` wide (512 in
the reference model): it keeps the weights small, makes the network
independent of input size, and makes Grad-CAM exact in closed form.
"""

from __future__ import annotations

import torch
from torch import nn

from models.families.backbones import VGG11_CONFIG, vgg_blocks, vgg_out_channels


class VGG11Radiomics(nn.Module):
    """VGG11 (configuration A, with batch norm) -> GAP -> FC-ReLU-FC-ReLU -> FC(2).

    ``forward`` returns ``(logits, deep_features, last_map)``; the deep
    features are the penultimate FC layer's activations, the SVM's input.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0, hidden: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = vgg_blocks(VGG11_CONFIG[:-1], in_channels, width)  # the last max-pool is folded into GAP
        channels = vgg_out_channels(VGG11_CONFIG, width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.feature_size = hidden

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last_map = self.features(image)
        first = self.drop(self.act(self.fc1(torch.flatten(self.pool(last_map), 1))))
        deep = self.act(self.fc2(first))
        return self.out(self.drop(deep)), deep, last_map

    def gradcam(self, last_map: torch.Tensor) -> torch.Tensor:
        """Grad-CAM of ``logit[1] - logit[0]`` on the last convolutional block, in closed form.

        After GAP the gradient is the same at every position, so the
        channel weights are ``W1^T (r1 * W2^T (r2 * (w[1] - w[0]))) / HW``
        with ``r1, r2`` the ReLU derivatives (dropout is off in eval mode).
        Returns the unnormalised map, shape (B, H, W).
        """
        pooled = torch.flatten(self.pool(last_map), 1)
        z1 = self.fc1(pooled)
        z2 = self.fc2(self.act(z1))
        # sign(relu(z)) is relu'(z) without a dtype cast, which keeps the graph convertible to fp16.
        upstream = torch.sign(torch.relu(z2)) * (self.out.weight[1] - self.out.weight[0])
        upstream = torch.sign(torch.relu(z1)) * (upstream @ self.fc2.weight)
        height, width = last_map.shape[-2:]
        weights = upstream @ self.fc1.weight / float(height * width)
        return torch.relu(torch.einsum("bc,bchw->bhw", weights, last_map))


class CLDLRExportWrapper(nn.Module):
    """Serving graph: ROI in; network logits, deep features (for the SVM) and Grad-CAM out."""

    def __init__(self, network: VGG11Radiomics) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, deep, last_map = self.network(image)
        return logits, deep, self.network.gradcam(last_map)
