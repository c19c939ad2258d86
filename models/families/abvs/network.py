"""ABVS three-plane classifier (Liu et al., Theranostics 2025).

Liu et al. classify breast lesions seen by an automated breast volume
scanner (ABVS) from three planes through the lesion: the transverse plane
the transducer acquires, and the sagittal and coronal planes the
workstation reconstructs from the volume ("Data collection"). Per plane, a
UNet finds the lesion, and the bounding box of each connected component
gives the region of interest; here the lesion mask of the volume stands
in for that UNet (:func:`models.training.abvs_volumes.plane_rois`), since
without ABVS data nothing could check the B-mode segmenter
(:func:`models.families.segmentation.network.lesion_segmenter`) on reconstructed planes. Each plane's ROI then
goes through its own ResNet-50, and the features are fused ("Model
development", equations 1 and 2):

* transverse and sagittal features are **added** (eq. 1),
* the sum is **concatenated** with the coronal features (eq. 2),
* a fully connected layer reduces the fused vector to **half** its width,
* a 2-way output layer gives benign / malignant logits.

At test time every frame (one transverse, sagittal and coronal image of the
lesion) gets a malignancy probability; the lesion's probability is their
mean, and the lesion is malignant when that mean exceeds 0.5. Grad-CAM
heat-maps are drawn per plane ("Image analysis", figures 4 and 5).

Where the paper is silent, this module chooses (and the model card says so):

* Fusion happens after global average pooling. The paper fuses "feature
  maps" before a convolution/FC; pooling is linear, so adding or
  concatenating maps and then pooling equals pooling and then adding or
  concatenating, and pooling first lets the three planes' ROIs have
  different sizes.
* A ReLU follows the half-width FC layer: two stacked linear layers
  without a non-linearity would collapse into one linear map, which would
  make the added layer pointless. No dropout is mentioned; it is available
  (``dropout``) and off by default.
* Class index 1 is malignant (:data:`MALIGNANT`), as everywhere in the
  project.

Volume axis convention (ABVS): a volume is indexed ``(z, y, x)`` with
``z`` the sweep position (one acquired frame per index, 0.5 mm apart on the
ACUSON S2000 the paper used), ``y`` the depth from the skin (image rows of
an acquired frame) and ``x`` the lateral position along the transducer
(image columns). Hence

* transverse = acquisition plane ``volume[z0, :, :]``: rows depth, columns lateral;
* sagittal = orthogonal to the transverse plane and to the skin,
  ``volume[:, :, x0].T``: rows depth, columns sweep;
* coronal = reconstructed plane parallel to the skin, ``volume[:, y0, :]``:
  rows sweep, columns lateral.

Depth runs down the rows of both skin-perpendicular planes, as on the
scanner's display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.families.backbones import ResNetTrunk
from models.families.onnx_export import export_graph
from models.inference.decisions import average_frame_probabilities  # noqa: F401 - the family's test-time rule, re-exported

MALIGNANT = 1
PLANES = ("transverse", "sagittal", "coronal")
EXPORT_INPUT_NAMES = PLANES
EXPORT_OUTPUT_NAMES = ("logits", "cam_transverse", "cam_sagittal", "cam_coronal")

PlaneMaps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ThreePlaneClassifier(nn.Module):
    """One ResNet per ABVS plane, fused by addition and concatenation (Liu et al. 2025, eqs. 1-2).

    Parameters
    ----------
    backbone_depth
        ResNet depth of every plane's trunk: 50 in the paper; 18 or 34 for
        quick tests and CPU references.
    in_channels
        1 for grayscale ultrasound.
    dropout
        Dropout before the output layer; the paper mentions none, so 0.
    width
        Channel multiplier of every trunk (:class:`models.families.backbones.ResNetTrunk`):
        1.0 in the paper; the shipped CPU model uses ResNet-18 trunks at 0.5
        (:mod:`models.families.abvs.recipe` says why).

    Notes
    -----
    Each plane has its own trunk (the paper initialises "each individual
    plane" from ImageNet weights), so the fusion is symmetric in the
    transverse and sagittal *features*, not in the input images.
    ``forward(transverse, sagittal, coronal)`` takes (N, in_channels, H, W)
    tensors (sizes may differ between planes) and returns (N, 2) logits.
    """

    def __init__(
        self, backbone_depth: int = 50, in_channels: int = 1, dropout: float = 0.0, width: float = 1.0
    ) -> None:
        super().__init__()
        self.transverse = ResNetTrunk(backbone_depth, in_channels, width)
        self.sagittal = ResNetTrunk(backbone_depth, in_channels, width)
        self.coronal = ResNetTrunk(backbone_depth, in_channels, width)
        channels = self.transverse.out_channels
        self.feature_channels = channels
        self.fused_width = 2 * channels  # [transverse + sagittal, coronal]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Linear(self.fused_width, self.fused_width // 2)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(self.fused_width // 2, 2)

    def plane_features(self, transverse: torch.Tensor, sagittal: torch.Tensor, coronal: torch.Tensor) -> PlaneMaps:
        """Last feature map of each plane's trunk, (N, C, h, w) each: what Grad-CAM explains."""
        return self.transverse(transverse), self.sagittal(sagittal), self.coronal(coronal)

    def fuse(self, transverse: torch.Tensor, sagittal: torch.Tensor, coronal: torch.Tensor) -> torch.Tensor:
        """Pooled fusion of three feature maps: ``cat(gap(t) + gap(s), gap(c))``, shape (N, 2C)."""
        added = torch.flatten(self.pool(transverse), 1) + torch.flatten(self.pool(sagittal), 1)
        return torch.cat([added, torch.flatten(self.pool(coronal), 1)], dim=1)

    def head(self, fused: torch.Tensor) -> torch.Tensor:
        """FC to half width, ReLU, (dropout), 2-way output."""
        result: torch.Tensor = self.output(self.dropout(self.act(self.reduce(fused))))
        return result

    def logits_from_features(
        self, transverse: torch.Tensor, sagittal: torch.Tensor, coronal: torch.Tensor
    ) -> torch.Tensor:
        """Logits from the three planes' feature maps (see :meth:`plane_features`)."""
        return self.head(self.fuse(transverse, sagittal, coronal))

    def forward_with_features(
        self, transverse: torch.Tensor, sagittal: torch.Tensor, coronal: torch.Tensor
    ) -> tuple[torch.Tensor, PlaneMaps]:
        """Logits and the per-plane feature maps in one pass."""
        maps = self.plane_features(transverse, sagittal, coronal)
        return self.logits_from_features(*maps), maps

    def forward(self, transverse: torch.Tensor, sagittal: torch.Tensor, coronal: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(*self.plane_features(transverse, sagittal, coronal))


class PlaneCams(NamedTuple):
    """Logits and one activation map per plane, each (N, h, w) at feature-map resolution."""

    logits: torch.Tensor
    transverse: torch.Tensor
    sagittal: torch.Tensor
    coronal: torch.Tensor


def rectify_and_normalise(cam: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ReLU, then divide every map of a (N, ..., h, w) batch by its own maximum.

    A map without positive evidence stays all zeros instead of having
    noise stretched to full scale (the convention of :mod:`models.inference.cam`).
    """
    positive = torch.relu(cam)
    peak = positive.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > eps, positive / peak.clamp_min(eps), torch.zeros_like(positive))


def grad_cam(
    model: ThreePlaneClassifier,
    transverse: torch.Tensor,
    sagittal: torch.Tensor,
    coronal: torch.Tensor,
    class_index: int = MALIGNANT,
    normalise: bool = True,
) -> PlaneCams:
    """Grad-CAM (Selvaraju et al. 2017) of each plane's last feature map, as Liu et al. draw it.

    Channel weights are the spatial means of the gradient of the class
    logit with respect to that plane's feature map; the map is the
    weighted channel sum, then (``normalise``) rectified and scaled to
    [0, 1] per sample. Put the model in eval mode first: with dropout or
    batch statistics active the maps describe a different network.

    Returns
    -------
    PlaneCams
        Detached logits (N, 2) and maps (N, h, w) per plane.
    """
    # The trunks run without a graph and the head is re-run on detached
    # leaves: only the head is differentiated, which is all Grad-CAM needs,
    # and it works even when the parameters are frozen.
    with torch.no_grad():
        maps = model.plane_features(transverse, sagittal, coronal)
    leaves = tuple(m.detach().requires_grad_(True) for m in maps)
    with torch.enable_grad():
        logits = model.logits_from_features(*leaves)
        # Samples are independent in eval mode, so the batch sum gives each sample its own gradient.
        gradients = torch.autograd.grad(logits[:, class_index].sum(), leaves)
    cams = []
    for feature, gradient in zip(leaves, gradients, strict=False):
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = (weights * feature.detach()).sum(dim=1)
        cams.append(rectify_and_normalise(cam) if normalise else cam)
    return PlaneCams(logits.detach(), cams[0], cams[1], cams[2])


def analytic_plane_cams(model: ThreePlaneClassifier, maps: PlaneMaps) -> tuple[torch.Tensor, PlaneMaps]:
    """Logits and raw Grad-CAM maps of *both* classes, computed without autograd.

    The head after pooling is ``W2 relu(W1 p + b1) + b2`` on the fused
    vector ``p = [gap(t) + gap(s), gap(c)]``, so
    ``d logit_k / d p = W1^T (relu'(W1 p + b1) * W2[k])``. Global average
    pooling spreads a gradient evenly over the ``h * w`` positions, so
    Grad-CAM's channel weights are that derivative divided by ``h * w``;
    the transverse and sagittal maps both take the first half of it
    (addition passes gradients unchanged), the coronal map the second.
    Only matrix products, comparisons and sums: exportable to ONNX.
    Assumes eval mode (dropout off).

    Returns
    -------
    tuple
        Logits (N, 2) and raw, unrectified maps (N, 2, h, w) per plane,
        channel ``k`` explaining class ``k`` (the layout of
        :class:`models.families.segmentation.network.CamExportWrapper`).
    """
    transverse, sagittal, coronal = maps
    hidden = model.reduce(model.fuse(transverse, sagittal, coronal))
    logits: torch.Tensor = model.output(model.act(hidden))
    active = (hidden > 0).to(hidden.dtype)  # relu' as PyTorch defines it (0 at 0)
    # (N, hidden, K): relu' times each class's output weights, one column per class.
    gated = active.unsqueeze(2) * model.output.weight.t().unsqueeze(0)
    d_fused = torch.matmul(model.reduce.weight.t(), gated)  # (N, 2C, K)
    channels = model.feature_channels
    d_added, d_coronal = d_fused[:, :channels], d_fused[:, channels:]

    def weighted_sum(feature: torch.Tensor, d_pooled: torch.Tensor) -> torch.Tensor:
        area = feature.shape[-2] * feature.shape[-1]
        weights = d_pooled / area  # (N, C, K)
        return (weights.unsqueeze(-1).unsqueeze(-1) * feature.unsqueeze(2)).sum(dim=1)

    return logits, (
        weighted_sum(transverse, d_added),
        weighted_sum(sagittal, d_added),
        weighted_sum(coronal, d_coronal),
    )


class ThreePlaneExportWrapper(nn.Module):
    """Export form: ``(transverse, sagittal, coronal) -> (logits, cam_transverse, cam_sagittal, cam_coronal)``.

    Inputs (N, 1, S, S) each; outputs logits (N, 2) and raw Grad-CAM maps
    (N, 2, h, w) per plane, computed in the graph by
    :func:`analytic_plane_cams`, so ONNX Runtime and TensorRT give the
    same heat-maps as PyTorch. Serving rectifies and normalises after
    upsampling (:func:`models.inference.cam.normalise_cam`), channel ``MALIGNANT``.
    """

    def __init__(self, classifier: ThreePlaneClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(
        self, transverse: torch.Tensor, sagittal: torch.Tensor, coronal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.classifier.training:
            raise RuntimeError("export the classifier in eval mode: the in-graph Grad-CAM assumes dropout is off")
        maps = self.classifier.plane_features(transverse, sagittal, coronal)
        logits, cams = analytic_plane_cams(self.classifier, maps)
        return logits, cams[0], cams[1], cams[2]


def export_onnx(model: ThreePlaneClassifier, path: Path, size: int = 224, opset: int = 17) -> Path:
    """Write the :class:`ThreePlaneExportWrapper` of ``model`` as ONNX (dynamic batch, fixed ``size``).

    Uses the TorchScript-based exporter (``dynamo=False``): the model is
    plain convolutions and matrix products, and that exporter needs no
    extra dependencies.
    """
    model.eval()
    wrapper = ThreePlaneExportWrapper(model).eval()
    example = tuple(torch.zeros(1, 1, size, size) for _ in PLANES)
    return export_graph(wrapper, example, path, EXPORT_INPUT_NAMES, EXPORT_OUTPUT_NAMES, opset, dynamic_batch=True)


# --- test-time decision ---------------------------------------------------------------


def malignancy_probabilities(logits: torch.Tensor) -> npt.NDArray[np.float64]:
    """Per-frame malignancy probability (softmax, class :data:`MALIGNANT`) from (N, 2) logits."""
    return np.asarray(torch.softmax(logits.detach().double(), dim=1)[:, MALIGNANT].cpu().numpy(), dtype=np.float64)


def decide(probability: float, threshold: float = 0.5) -> Literal["malignant", "benign"]:
    """Malignant when the lesion probability *exceeds* ``threshold`` (0.5 in the paper), else benign."""
    return "malignant" if probability > threshold else "benign"


# --- planes through a volume ----------------------------------------------------------

Centre = tuple[int, int, int]


def box_centre(box: tuple[int, int, int, int, int, int]) -> Centre:
    """Centre voxel ``(z, y, x)`` of a 3-D box ``(z0, y0, x0, depth, height, width)``."""
    z0, y0, x0, dz, dy, dx = box
    return z0 + dz // 2, y0 + dy // 2, x0 + dx // 2


def volume_box(mask: npt.NDArray[np.generic]) -> tuple[int, int, int, int, int, int] | None:
    """Bounding box ``(z0, y0, x0, depth, height, width)`` of a (z, y, x) mask's non-zero voxels, or None."""
    points = np.argwhere(mask)
    if points.size == 0:
        return None
    low, high = points.min(axis=0), points.max(axis=0) + 1
    return int(low[0]), int(low[1]), int(low[2]), int(high[0] - low[0]), int(high[1] - low[1]), int(high[2] - low[2])


def lesion_centre(mask: npt.NDArray[np.generic]) -> Centre:
    """A voxel inside a (z, y, x) lesion mask, as close as possible to its bounding-box centre.

    The box centre of a crescent- or ring-shaped lesion can lie outside
    it; snapping to the nearest lesion voxel makes every plane through the
    centre cut the lesion.
    """
    box = volume_box(mask)
    if box is None:
        raise ValueError("the lesion mask is empty")
    target = np.asarray(box_centre(box))
    points = np.argwhere(mask)
    nearest = points[int(np.argmin(((points - target) ** 2).sum(axis=1)))]
    return int(nearest[0]), int(nearest[1]), int(nearest[2])


def extract_planes(
    volume: npt.NDArray[np.generic], centre: Centre, offset: int = 0
) -> tuple[npt.NDArray[np.generic], ...]:
    """Transverse, sagittal and coronal slices through ``centre`` of a (z, y, x) volume.

    Each plane is moved ``offset`` voxels along its own normal (transverse
    along z, sagittal along x, coronal along y), clipped to the volume, so
    a range of offsets gives neighbouring frames. Axis convention in the
    module docstring: transverse (y, x), sagittal (y, z), coronal (z, x).
    Works the same on a lesion mask, which is how the per-plane lesion
    boxes are found. The slices are views of ``volume`` (the sagittal one
    non-contiguous); copy them before handing them to OpenCV.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    depth, rows, cols = volume.shape
    z, y, x = centre
    if not (0 <= z < depth and 0 <= y < rows and 0 <= x < cols):
        raise ValueError(f"centre {centre} lies outside the volume of shape {volume.shape}")
    z = int(np.clip(z + offset, 0, depth - 1))
    y = int(np.clip(y + offset, 0, rows - 1))
    x = int(np.clip(x + offset, 0, cols - 1))
    return volume[z, :, :], volume[:, :, x].T, volume[:, y, :]


def frame_offsets(count: int, step: int = 1) -> list[int]:
    """``count`` offsets ``step`` voxels apart, centred on 0 (the lesion centre comes first when count is odd)."""
    if count < 1 or step < 1:
        raise ValueError("count and step must be positive")
    offsets = [step * (index - count // 2) for index in range(count)]
    return sorted(offsets, key=lambda value: (abs(value), value))


def extract_frames(
    volume: npt.NDArray[np.generic], centre: Centre, count: int = 5, step: int = 1
) -> list[tuple[npt.NDArray[np.generic], ...]]:
    """``count`` neighbouring (transverse, sagittal, coronal) triplets around ``centre`` (see :func:`extract_planes`).

    Each triplet is one "image frame" of the paper's test-time averaging.
    """
    return [extract_planes(volume, centre, offset) for offset in frame_offsets(count, step)]
