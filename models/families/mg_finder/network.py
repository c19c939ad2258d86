"""The mammography lesion finder's network (PyTorch; training and ONNX export only, serving runs the exported graph).

The ultrasound refiner's architecture (MONAI ``BasicUNet``,
:func:`models.families.segmentation.network.lesion_refiner`) at half its
width, with batch norm instead of instance norm. Half width keeps the fp32
file near 2 MB and a 256 px training step affordable on two CPU cores. Batch
norm, because the finder trains on 256 px crops and serves whole images: its
statistics are fixed at export (recalibrated on training images), whereas
instance norm would normalise a crop and a whole breast differently.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn

#: Channels of BasicUNet's five encoder levels and its last decoder stage: the refiner's (16..256, 16) halved.
FEATURES = (8, 16, 32, 64, 128, 8)
#: Every input side must be a multiple of this (four 2x poolings), or the decoder's skip connections misalign.
SIDE_MULTIPLE = 16


def mammogram_finder_network() -> nn.Module:
    """BasicUNet, one input channel (the standardised mammogram), one logit channel (lesion heat map).

    Fully convolutional: the exported graph takes any height and width
    that are multiples of :data:`SIDE_MULTIPLE` (serving pads to them).
    """
    return BasicUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        features=FEATURES,
        norm=("batch", {"affine": True}),
    )


class FinderExportWrapper(nn.Module):
    """Names the finder's single output (``logits``: one channel, the input's height and width) for export."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.network(image)
        return result
