"""Convolutional trunks shared by the families: ResNet (standard stem) and VGG.

ResNets come from MONAI with the papers' 7x7 stride-2 stem and max-pool
(MONAI's default ``conv1_t_stride=1`` costs four times the FLOPs). VGG is
not in MONAI, so the plain configuration list of Simonyan & Zisserman
(2015, table 1) is built here, with batch normalisation after every
convolution as in the common "VGG-BN" variant used for training from
scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ResNet, resnet18, resnet34, resnet50
from torch import nn

_RESNETS = {18: resnet18, 34: resnet34, 50: resnet50}

# Simonyan & Zisserman table 1, configuration A (11 weight layers: 8 conv + 3 FC).
VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class ResNetTrunk(nn.Module):
    """A ResNet without its pooling and head: image in, last feature map out.

    Parameters
    ----------
    depth
        18, 34 or 50.
    in_channels
        1 for grayscale ultrasound/mammography.
    width
        Multiplies every stage's channel count (MONAI's ``widen_factor``): 1.0
        is the paper's network; less makes a lighter trunk for CPU budgets
        (the ABVS three-plane model's three trunks at 0.5), and its card says so.
    """

    def __init__(self, depth: int = 50, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, not {depth}")
        if not 0.0 < width <= 4.0:
            raise ValueError(f"ResNet width must lie in (0, 4], not {width}")
        backbone: ResNet = _RESNETS[depth](
            spatial_dims=2,
            n_input_channels=in_channels,
            num_classes=1,
            conv1_t_size=7,
            conv1_t_stride=2,
            widen_factor=width,
        )
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act, backbone.maxpool)
        self.stages = nn.Sequential(backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
        # The last stage's channels: 512 (ResNet-18/34) or 2048 (ResNet-50) at width 1.
        self.out_channels = int(backbone.in_planes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.stages(self.stem(image))
        return result


def vgg_blocks(config: Sequence[int | str], in_channels: int = 1, width: float = 1.0) -> nn.Sequential:
    """VGG convolutional body from a configuration list ("M" = 2x2 max-pool).

    ``width`` scales every channel count (1.0 is the paper's network; the
    CPU reference models may use less, and their cards say so).
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = max(8, round(int(item) * width))
        layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers)


def vgg_out_channels(config: Sequence[int | str], width: float = 1.0) -> int:
    """Channels of the last convolution of :func:`vgg_blocks`."""
    last = [int(item) for item in config if item != "M"][-1]
    return max(8, round(last * width))
