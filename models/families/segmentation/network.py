"""The segmentation networks (PyTorch; training and ONNX export only, serving runs the exported graphs).

Built on MONAI so that the architectures are the library's, not ours:
``FlexibleUNet`` with an EfficientNet-b0 encoder for lesion segmentation,
and MONAI's ResNet with the standard 7x7 stride-2 stem (MONAI's default
``conv1_t_stride=1`` would cost four times the FLOPs of the papers'
ResNets) for ROI classification.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from monai.networks.nets import BasicUNet, FlexibleUNet, ResNet, resnet18
from torch import nn


def lesion_segmenter() -> nn.Module:
    """UNet with an EfficientNet-b0 encoder, one input channel, one logit channel.

    Initialised from scratch: no ImageNet weights can be fetched here.
    MONAI's EfficientNet takes TensorFlow's batch-norm momentum (0.99, i.e.
    0.01 in PyTorch terms), which suits ImageNet-length runs; on a short
    run from scratch the running statistics lag far behind the weights and
    eval-mode output collapses to background, so PyTorch's 0.1 is used.
    """
    network = FlexibleUNet(in_channels=1, out_channels=1, backbone="efficientnet-b0", pretrained=False, spatial_dims=2)
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return network


def lesion_refiner() -> nn.Module:
    """The close-up refiner (:mod:`models.inference.refine`): MONAI's BasicUNet, 16-256 channels, instance norm.

    It sees one lesion window, not a whole scan, so it needs no large
    encoder: about 2 M parameters (4 MB in fp16), a quarter of the
    segmenter's, which keeps the bundled weights within their budget.
    Instance norm has no running statistics to recalibrate.
    """
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(16, 32, 64, 128, 256, 16))


@torch.no_grad()
def recalibrate_batch_norm(network: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Recompute every batch-norm layer's running statistics as a plain average over ``batches``.

    Makes eval-mode statistics match the final weights exactly, whatever
    momentum the layers were trained with.
    """
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average
        layer.train()
    device = next(network.parameters()).device
    for batch in batches:
        network(batch.to(device))
    for layer, (momentum, training) in zip(layers, saved, strict=False):
        layer.momentum = momentum
        layer.train(training)


class CamClassifier(nn.Module):
    """ResNet whose head is global average pooling + linear, exposing its last feature map.

    ``forward`` returns ``(logits, features)``: the features of the last
    convolutional stage are what the class-activation map is computed
    from, so the exported graph can carry the map as an output.
    """

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act, backbone.maxpool)
        self.stages = nn.Sequential(backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if not isinstance(backbone.fc, nn.Linear):
            raise ValueError("CamClassifier needs a backbone with a linear classification head (num_classes > 0)")
        self.fc: nn.Linear = backbone.fc

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stages(self.stem(image))
        logits = self.fc(torch.flatten(self.pool(features), 1))
        return logits, features


def roi_classifier(num_classes: int = 2) -> CamClassifier:
    """ResNet-18 benign/malignant ROI classifier with a standard stem, from scratch."""
    backbone = resnet18(spatial_dims=2, n_input_channels=1, num_classes=num_classes, conv1_t_size=7, conv1_t_stride=2)
    return CamClassifier(backbone)


class CamExportWrapper(nn.Module):
    """Adds the class-activation maps to a :class:`CamClassifier`'s outputs for export.

    ``cam[k] = sum_c W[k, c] * features[c]`` (Zhou et al. 2016); for a
    GAP + linear head this is Grad-CAM, and having it in the graph gives
    the same map on ONNX Runtime, TensorRT and PyTorch. The sum is a 1x1
    convolution holding a copy of the head's weights (a plain initializer
    that the fp16 converter handles), so build the wrapper after the
    classifier's weights are final.
    """

    def __init__(self, classifier: CamClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        classes, channels = classifier.fc.weight.shape
        self.cam_head = nn.Conv2d(channels, classes, kernel_size=1, bias=False)
        with torch.no_grad():
            self.cam_head.weight.copy_(classifier.fc.weight[:, :, None, None])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, features = self.classifier(image)
        return logits, features, self.cam_head(features)


class SegmenterExportWrapper(nn.Module):
    """Names the segmenter's single output for export."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.segmenter(image)
        return result
