"""MUP-Net: multimodal ultrasound prototype network (Yan et al., Commun Med 2024).

Paper: "A domain knowledge-based interpretable deep learning system for
improving clinical breast ultrasound diagnosis", Commun Med 4:90 (2024),
doi:10.1038/s43856-024-00518-7, section "Interpretable deep learning model",
equations (1)-(6). The model is a multimodal ProtoPNet (Chen et al. 2019,
the paper's ref. 34):

* one independent ResNet-18 trunk ``f^m`` per ultrasound modality (B-mode,
  colour Doppler, elastography; eq. 1), each followed by ProtoPNet's
  "regular" add-on head (1x1 conv, ReLU, 1x1 conv, sigmoid) into the
  prototype space;
* ``N`` prototypes per modality, each a 1x1 vector in latent space
  (``H^m = W^m = 1``), split evenly between the classes (benign, malignant);
* similarity of prototype ``j`` of modality ``m`` to image ``i`` (eq. 2):
  ``s = avg(top_k(log((d + 1) / (d + eps))))`` over the latent positions,
  ``d`` the squared L2 distance between the prototype and the latent patch;
* a bias-free fully-connected layer from the ``M*N`` similarities to the
  two logits (eq. 3), initialised +1 for a prototype's own class and -0.5
  for the other;
* a contribution score per prototype: its similarity times its weight in
  the last layer toward a class, so the contributions sum to that logit.

Input convention: one tensor ``(B, M, C, H, W)`` holding the ``M`` paired
images of a lesion, in the order the model was trained with (the paper's
order is B-mode, colour Doppler, elastography). All modalities share ``C``
and the spatial size (the paper crops each modality to the same lesion box
and resizes). A single tensor keeps the exported ONNX graph at one input.

Choices where the paper is silent or ambiguous (see the docstrings below
for the reasoning):

* prototype channels 512 and ``top_k`` 5: the paper does not give them;
  these are the values of the authors' released training script
  (``prototype_shape = (N, 512, 1, 1)``, ``topk_k = 5``);
* loss signs: eq. (6) prints alpha = 0.8 on ``L_sep`` and beta = -0.08 on
  ``L_clu``, which read literally would push latent patches *away* from
  their own-class prototypes. We implement ProtoPNet's convention, which
  the authors' code uses with exactly these numbers:
  ``CE + 0.8 * Clst - 0.08 * Sep + 1e-4 * L1`` (:func:`mupnet_loss`);
* the L1 term covers only the connections to the *other* class, as in
  ProtoPNet, so the +1 own-class weights are not shrunk;
* the last layer is frozen in the warm-up and joint stages (the paper's
  stage 1 optimises only ``f^m`` and ``P``) and is the only thing trained
  in stage 3;
* projection gives every prototype of a modality its own source image, or
  its own patient where the caller names them (:func:`project_prototypes`,
  ``distinct_sources``, ``source_groups``): the paper projects
  each onto its nearest patch independently, which can show a radiologist
  the same patch as two prototypes;
* backbones start from scratch: no ImageNet weights can be fetched here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.families.backbones import ResNetTrunk
from models.families.onnx_export import export_graph

#: Modality order of the paper (and the default input order).
PAPER_MODALITIES: tuple[str, ...] = ("bmode", "doppler", "elastography")

#: Prototype candidate BI-RADS categories per modality, (benign set, malignant set).
#: Paper, section "Interpretable deep learning model": benign and malignant
#: prototypes of B-mode and colour Doppler come from biopsy-confirmed
#: BI-RADS 3/4a versus 4c/5 lesions, those of elastography from BI-RADS 3
#: versus 5; 4b is never a candidate. Table 1 groups "3 or lower", so 2 is
#: accepted with 3.
PAPER_PROTOTYPE_BIRADS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "bmode": (frozenset({"2", "3", "4a"}), frozenset({"4c", "5"})),
    "doppler": (frozenset({"2", "3", "4a"}), frozenset({"4c", "5"})),
    "elastography": (frozenset({"2", "3"}), frozenset({"5"})),
}

#: Names of the exported graph's input and outputs (:class:`MUPNetExportWrapper`).
EXPORT_INPUT_NAMES: tuple[str, ...] = ("images",)
EXPORT_OUTPUT_NAMES: tuple[str, ...] = ("logits", "similarities", "contributions", "similarity_maps")

# ProtoPNet's epsilon in the log-similarity (the paper only says "a small number").
DEFAULT_EPSILON = 1e-4
# Percentile of the upsampled similarity map that bounds the "prototypical part" box (ProtoPNet's choice).
ACTIVATION_PERCENTILE = 95.0


# ---------------------------------------------------------------------------------------------------------------------
# Receptive field
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceptiveField:
    """Where a latent position's theoretical receptive field lies in the input image.

    Latent index ``i`` (along one axis) sees input pixels
    ``[i * jump + offset, i * jump + offset + size)``, before clipping to
    the image (negative coordinates are zero padding).
    """

    jump: int
    offset: int
    size: int

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Half-open pixel box ``(y0, x0, y1, x1)`` of latent position ``(row, col)``, clipped to the image."""
        y0 = row * self.jump + self.offset
        x0 = col * self.jump + self.offset
        return (max(0, y0), max(0, x0), min(height, y0 + self.size), min(width, x0 + self.size))


def _square(value: int | tuple[int, ...]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"receptive_field supports square kernels, strides and paddings only, not {value}")
    return int(value[0])


def receptive_field(module: nn.Module) -> ReceptiveField:
    """Receptive field of ``module``'s output, composed from its convolutions and poolings.

    Walks ``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d`` layers in registration
    order, which for :class:`ResNetTrunk` (MONAI blocks) is execution order
    along the main path. Residual ``downsample`` shortcuts are skipped: they
    see a subset of what the parallel main path sees, so they never widen
    the field. Composition per layer (kernel ``k``, stride ``s``, padding
    ``p``, dilation ``r``), with ``J``, ``O``, ``R`` the jump, offset and
    size so far: ``O += -p * J``; ``R += (r * (k - 1)) * J``; ``J *= s``.
    """
    jump, offset, size = 1, 0, 1
    for name, layer in module.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(layer, nn.Conv2d):
            kernel, stride = _square(layer.kernel_size), _square(layer.stride)
            if isinstance(layer.padding, str):
                raise ValueError("receptive_field needs numeric convolution padding")
            padding, dilation = _square(layer.padding), _square(layer.dilation)
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            kernel, stride, padding = _square(layer.kernel_size), _square(layer.stride), _square(layer.padding)
            dilation = _square(layer.dilation) if isinstance(layer, nn.MaxPool2d) else 1
        else:
            continue
        offset -= padding * jump
        size += dilation * (kernel - 1) * jump
        jump *= stride
    return ReceptiveField(jump=jump, offset=offset, size=size)


# ---------------------------------------------------------------------------------------------------------------------
# Prototype layer
# ---------------------------------------------------------------------------------------------------------------------


class PrototypeActivations(NamedTuple):
    """Distances and similarities of every prototype to every latent position.

    Prototype axes are ``(M, P)`` here; :class:`MUPNetOutput` flattens them.
    """

    distance_maps: torch.Tensor  # (B, M, P, h, w) squared L2 distances d
    similarity_maps: torch.Tensor  # (B, M, P, h, w) log((d + 1) / (d + eps))
    min_distances: torch.Tensor  # (B, M, P)
    similarities: torch.Tensor  # (B, M, P) mean of the top-k similarity values


def prototype_activations(
    latent: torch.Tensor, prototypes: torch.Tensor, top_k: int, epsilon: float = DEFAULT_EPSILON
) -> PrototypeActivations:
    """Eq. (2) of the paper for all modalities at once.

    Parameters
    ----------
    latent
        ``(B, M, C, h, w)`` latent feature maps (after the add-on layers).
    prototypes
        ``(M, P, C)`` prototype vectors (1x1 prototypes with the spatial
        axes dropped).
    top_k
        Number of most similar latent positions averaged; clipped to
        ``h * w`` so small inputs still work.
    epsilon
        The paper's small number avoiding division by zero.

    Notes
    -----
    ``d`` is computed as the sum of squared differences, not ProtoPNet's
    ``|z|^2 - 2 z.p + |p|^2`` expansion: the expansion cancels
    catastrophically near zero, whereas the difference is exactly 0 for a
    prototype projected onto a patch, which the projection stage and its
    visualisation rely on. The price is a ``(B, M, P, C, h, w)``
    intermediate: about 250 MB of fp32 at the authors' batch of 40, 300 px
    input (10x10 latent) and C = 512, acceptable for training on a GPU. ``log((d+1)/(d+eps))`` falls monotonically
    from ``log(1/eps)`` at ``d = 0`` towards 0, so top-k of the similarity
    equals the similarity of the k smallest distances.
    """
    difference = latent[:, :, None] - prototypes[None, :, :, :, None, None]  # (B, M, P, C, h, w)
    distance_maps = difference.pow(2).sum(dim=3)
    similarity_maps = torch.log((distance_maps + 1.0) / (distance_maps + epsilon))
    flat = similarity_maps.flatten(start_dim=3)
    k = min(top_k, flat.shape[-1])
    similarities = flat.topk(k, dim=-1).values.mean(dim=-1)
    min_distances = distance_maps.flatten(start_dim=3).amin(dim=-1)
    return PrototypeActivations(distance_maps, similarity_maps, min_distances, similarities)


class MUPNetOutput(NamedTuple):
    """What :meth:`MUPNet.forward` returns.

    Prototype index ``g = m * P + j`` (modality ``m``, prototype ``j``)
    everywhere, the paper's column order of ``w_h``.
    """

    logits: torch.Tensor  # (B, K)
    similarities: torch.Tensor  # (B, M*P) eq. (2)
    min_distances: torch.Tensor  # (B, M*P) min over positions of d
    similarity_maps: torch.Tensor  # (B, M*P, h, w) per-position similarity, latent resolution


def _add_on(in_channels: int, prototype_channels: int) -> nn.Sequential:
    """ProtoPNet's "regular" add-on head (the authors' script sets ``add_on_layers_type='regular'``).

    The sigmoid bounds the latent space to [0, 1], the range of the
    uniformly initialised prototypes (paper: "randomly initialized using
    the uniform distribution").
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, prototype_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(prototype_channels, prototype_channels, kernel_size=1),
        nn.Sigmoid(),
    )


class MUPNet(nn.Module):
    """Multimodal ultrasound prototype network (paper Supplementary Fig. 2, eqs. 1-3).

    Parameters
    ----------
    modalities
        ``M``, number of paired images per lesion (3 in the paper).
    prototypes_per_modality
        ``N``, split evenly between the classes: prototypes ``0 .. N/K - 1``
        of each modality belong to class 0 (benign), the next ``N/K`` to
        class 1 (malignant). The paper's best is 10 (Supplementary Table 1).
    prototype_channels
        ``C`` of the prototype space (512 in the authors' code).
    backbone_depth
        ResNet depth of each trunk (18 in the paper).
    top_k
        Latent positions averaged in eq. (2) (5 in the authors' code).
    in_channels
        Image channels shared by all modalities (1 for grayscale; 3 keeps
        the colour of Doppler and elastography, with B-mode replicated).
    num_classes
        ``K``; 2 (benign, malignant) in the paper.
    epsilon
        The small number of eq. (2).
    """

    prototype_class: torch.Tensor  # (M*P,) buffer: class of every prototype

    def __init__(
        self,
        modalities: int = 3,
        prototypes_per_modality: int = 10,
        prototype_channels: int = 512,
        backbone_depth: int = 18,
        top_k: int = 5,
        in_channels: int = 1,
        num_classes: int = 2,
        epsilon: float = DEFAULT_EPSILON,
    ) -> None:
        super().__init__()
        if modalities < 1:
            raise ValueError("MUPNet needs at least one modality")
        if num_classes < 2 or prototypes_per_modality % num_classes:
            raise ValueError(
                f"prototypes_per_modality ({prototypes_per_modality}) must split evenly between {num_classes} classes"
            )
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        self.modalities = modalities
        self.prototypes_per_modality = prototypes_per_modality
        self.prototype_channels = prototype_channels
        self.num_classes = num_classes
        self.top_k = top_k
        self.in_channels = in_channels
        self.epsilon = epsilon
        self.trunks = nn.ModuleList(ResNetTrunk(backbone_depth, in_channels) for _ in range(modalities))
        trunk_channels = self._trunk(0).out_channels
        self.add_ons = nn.ModuleList(_add_on(trunk_channels, prototype_channels) for _ in range(modalities))
        self.prototypes = nn.Parameter(torch.rand(modalities, prototypes_per_modality, prototype_channels))
        per_class = prototypes_per_modality // num_classes
        classes = torch.arange(prototypes_per_modality) // per_class
        self.register_buffer("prototype_class", classes.repeat(modalities), persistent=False)
        self.last_layer = nn.Linear(modalities * prototypes_per_modality, num_classes, bias=False)
        self.reset_last_layer()
        # The add-on convolutions are 1x1, so the trunk alone fixes the receptive field.
        self.receptive_field = receptive_field(self._trunk(0))

    def _trunk(self, index: int) -> ResNetTrunk:
        trunk = self.trunks[index]
        assert isinstance(trunk, ResNetTrunk)
        return trunk

    @property
    def num_prototypes(self) -> int:
        """``M * P``, the width of the similarity vector."""
        return self.modalities * self.prototypes_per_modality

    def class_identity(self) -> torch.Tensor:
        """``(M*P, K)`` one-hot class of every prototype."""
        return F.one_hot(self.prototype_class, self.num_classes).to(self.prototypes.dtype)

    @torch.no_grad()
    def reset_last_layer(self, incorrect_strength: float = -0.5) -> None:
        """Paper eq. (3) initialisation: ``w_h = 1`` own class, ``-0.5`` other classes."""
        identity = self.class_identity().t()  # (K, M*P)
        self.last_layer.weight.copy_(identity + incorrect_strength * (1.0 - identity))

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, M, C, h, w)`` prototype-space features, eq. (1) plus the add-on head."""
        if images.dim() != 5 or images.shape[1] != self.modalities or images.shape[2] != self.in_channels:
            raise ValueError(
                f"MUPNet expects images of shape (B, {self.modalities}, {self.in_channels}, H, W), got "
                f"{tuple(images.shape)}"
            )
        features = [
            add_on(trunk(images[:, m]))
            for m, (trunk, add_on) in enumerate(zip(self.trunks, self.add_ons, strict=False))
        ]
        return torch.stack(features, dim=1)

    def activations(self, latent: torch.Tensor) -> PrototypeActivations:
        """Eq. (2) on a latent tensor from :meth:`latent`."""
        return prototype_activations(latent, self.prototypes, self.top_k, self.epsilon)

    def forward(self, images: torch.Tensor) -> MUPNetOutput:
        """Logits and the prototype evidence for ``images`` of shape ``(B, M, C, H, W)``."""
        act = self.activations(self.latent(images))
        similarities = act.similarities.flatten(start_dim=1)
        logits: torch.Tensor = self.last_layer(similarities)
        return MUPNetOutput(
            logits=logits,
            similarities=similarities,
            min_distances=act.min_distances.flatten(start_dim=1),
            similarity_maps=act.similarity_maps.flatten(start_dim=1, end_dim=2),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """Coefficients of :func:`mupnet_loss` (paper eq. 6, ProtoPNet sign convention).

    The paper prints ``L = L_ce + alpha L_sep + beta L_clu + gamma L_reg``
    with alpha = 0.8, beta = -0.08, gamma = 1e-4, and defines ``L_sep``
    with a leading minus (eq. 5). Read literally, both prototype terms would
    then reward *larger* distances, and the clustering term would push each
    image away from its own-class prototypes, the opposite of its stated
    purpose ("encourage some pixels of z being close to the prototypes" of
    its class). The three numbers are exactly ProtoPNet's defaults
    (``clst = 0.8``, ``sep = -0.08``, ``l1 = 1e-4`` on positive distances),
    which the paper says it follows (refs. 33, 34) and the authors'
    released script uses. So the labels of alpha and beta are swapped in
    the text, and the loss is ``CE + 0.8 Clst - 0.08 Sep + 1e-4 L1`` with
    ``Clst``, ``Sep`` the positive minimum distances.
    """

    clustering: float = 0.8
    separation: float = 0.08
    l1: float = 1e-4


class LossTerms(NamedTuple):
    """The total loss and its unweighted parts (all scalars)."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    clustering: torch.Tensor  # Clst, eq. (4): mean over images, sum over modalities, of the min own-class distance
    separation: torch.Tensor  # Sep = -L_sep of eq. (5): same with the other classes' prototypes
    l1: torch.Tensor  # L1 norm of the last layer's other-class connections


def _min_distance_to(model: MUPNet, min_distances: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_m mean_i min_{j in mask} d`` (eqs. 4-5), ``mask`` of shape ``(B, M*P)``."""
    shape = (min_distances.shape[0], model.modalities, model.prototypes_per_modality)
    masked = min_distances.masked_fill(~mask, math.inf).reshape(shape)
    return masked.amin(dim=-1).sum(dim=1).mean()


def last_layer_l1(model: MUPNet) -> torch.Tensor:
    """L1 norm of the last-layer weights between a prototype and the classes it does not belong to.

    The paper says only "L1-norm is applied on w_h"; ProtoPNet (which the
    paper follows) masks out the own-class connections so that the
    initial +1 weights are kept while the -0.5 ones are driven to 0.
    """
    other = 1.0 - model.class_identity().t()
    return (model.last_layer.weight * other).abs().sum()


def mupnet_loss(
    model: MUPNet, output: MUPNetOutput, labels: torch.Tensor, weights: LossWeights = LossWeights()
) -> LossTerms:
    """Paper eq. (6) in the sign convention explained in :class:`LossWeights`.

    ``total = CE + w.clustering * Clst - w.separation * Sep + w.l1 * L1``.
    """
    return _loss_terms(model, output.logits, output.min_distances, labels, weights)


def _loss_terms(
    model: MUPNet, logits: torch.Tensor, min_distances: torch.Tensor, labels: torch.Tensor, weights: LossWeights
) -> LossTerms:
    cross_entropy = F.cross_entropy(logits, labels)
    own = model.prototype_class[None, :] == labels[:, None]  # (B, M*P)
    clustering = _min_distance_to(model, min_distances, own)
    separation = _min_distance_to(model, min_distances, ~own)
    l1 = last_layer_l1(model)
    total = cross_entropy + weights.clustering * clustering - weights.separation * separation + weights.l1 * l1
    return LossTerms(total, cross_entropy, clustering, separation, l1)


# ---------------------------------------------------------------------------------------------------------------------
# Contributions
# ---------------------------------------------------------------------------------------------------------------------


def contributions_from(
    model: MUPNet, similarities: torch.Tensor, target: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Contribution of every prototype toward ``target``: ``s_g * w_h[target, g]``, shape ``(B, M*P)``.

    The paper (section "Interpretable deep learning model"): "similarity
    scores are converted into contribution scores by combining the
    associated weights from the last fully connected layer". The last
    layer has no bias (eq. 3), so the contributions sum exactly to the
    target's logit. ``target`` is a class index, a ``(B,)`` tensor of
    class indices, or ``None`` for each sample's predicted class.
    """
    weight = model.last_layer.weight  # (K, M*P)
    if target is None:
        target = (similarities @ weight.t()).argmax(dim=1)
    if isinstance(target, int):
        return similarities * weight[target][None, :]
    return similarities * weight[target]


def contribution_scores(model: MUPNet, images: torch.Tensor, target: int | torch.Tensor | None = None) -> torch.Tensor:
    """Run ``model`` on ``images`` and return :func:`contributions_from` its similarities, ``(B, M*P)``.

    Call in eval mode (and under ``torch.no_grad()`` for inference): batch
    norm in train mode would make the scores depend on the batch.
    """
    return contributions_from(model, model(images).similarities, target)


# ---------------------------------------------------------------------------------------------------------------------
# Training stages
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """Sample-weighted means of the loss terms over one pass, plus accuracy."""

    loss: float = 0.0
    cross_entropy: float = 0.0
    clustering: float = 0.0
    separation: float = 0.0
    l1: float = 0.0
    accuracy: float = 0.0
    samples: int = 0

    def _add(self, terms: LossTerms, correct: int, count: int) -> None:
        for name in ("cross_entropy", "clustering", "separation", "l1"):
            setattr(self, name, getattr(self, name) + float(getattr(terms, name).detach()) * count)
        self.loss += float(terms.total.detach()) * count
        self.accuracy += correct
        self.samples += count

    def _finish(self) -> EpochStats:
        if self.samples:
            for name in ("loss", "cross_entropy", "clustering", "separation", "l1", "accuracy"):
                setattr(self, name, getattr(self, name) / self.samples)
        return self


class FrozenEvidence(NamedTuple):
    """What the last layer and the loss read of each image while nothing upstream of the last layer trains.

    In paper stage 3 the model runs in eval mode with everything but
    ``w_h`` frozen, so every image's similarities and minimum distances stay
    the same from one epoch to the next. :func:`frozen_evidence` computes
    them once; :func:`train_last_layer_epoch` then trains on them with the
    same updates as on the images, without running the trunks every epoch.
    """

    similarities: torch.Tensor  # (N, M*P)
    min_distances: torch.Tensor  # (N, M*P)

    def take(self, index: torch.Tensor) -> FrozenEvidence:
        """The rows ``index`` (a batch)."""
        return FrozenEvidence(self.similarities[index], self.min_distances[index])

    def to(self, device: torch.device) -> FrozenEvidence:
        return FrozenEvidence(self.similarities.to(device), self.min_distances.to(device))


@torch.no_grad()
def frozen_evidence(model: MUPNet, batches: Iterable[torch.Tensor]) -> FrozenEvidence:
    """:class:`FrozenEvidence` of every image in ``batches`` (each ``(B, M, C, H, W)``), in order; eval mode."""
    model.eval()
    device = _device(model)
    similarities, min_distances = [], []
    for images in batches:
        output = model(images.to(device))
        similarities.append(output.similarities)
        min_distances.append(output.min_distances)
    return FrozenEvidence(torch.cat(similarities), torch.cat(min_distances))


def evidence_probability(model: MUPNet, evidence: FrozenEvidence) -> torch.Tensor:
    """``(N, K)`` class probabilities from frozen evidence: the model's softmax output on the images it came from."""
    with torch.no_grad():
        return torch.softmax(model.last_layer(evidence.similarities.to(_device(model))), dim=1)


LoaderBatch = Sequence[Any]  # (images | FrozenEvidence, labels) or (images, labels, eligible)


def _unpack(
    batch: LoaderBatch, device: torch.device
) -> tuple[torch.Tensor | FrozenEvidence, torch.Tensor, torch.Tensor | None]:
    """``(images, labels)``, ``(evidence, labels)`` or ``(images, labels, eligible)`` from a loader batch."""
    if len(batch) not in (2, 3):
        raise ValueError("MUP-Net batches are (images, labels), (evidence, labels) or (images, labels, eligible)")
    inputs = batch[0]
    if not isinstance(inputs, (torch.Tensor, FrozenEvidence)):
        raise TypeError(f"MUP-Net batch inputs are images or FrozenEvidence, not {type(inputs).__name__}")
    labels = batch[1].to(device).long()
    eligible = batch[2].to(device).bool() if len(batch) == 3 else None
    return inputs.to(device), labels, eligible


def set_trainable(model: MUPNet, stage: Literal["warm", "joint", "last"]) -> None:
    """Freeze/unfreeze parameter groups for a stage.

    ``"warm"``: add-on layers and prototypes (ProtoPNet's warm-up, used by
    the authors' script for the first epochs); ``"joint"``: trunks, add-on
    layers and prototypes (paper stage 1: "three independent feature
    extractors and the prototype set P were optimized"); ``"last"``: the
    last layer only (paper stage 3). The last layer is frozen outside
    ``"last"`` so that its +1/-0.5 structure guides stage 1.
    """
    if stage not in ("warm", "joint", "last"):
        raise ValueError(f"unknown MUP-Net stage {stage!r}")
    model.trunks.requires_grad_(stage == "joint")
    model.add_ons.requires_grad_(stage in ("warm", "joint"))
    model.prototypes.requires_grad_(stage in ("warm", "joint"))
    model.last_layer.requires_grad_(stage == "last")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


Precision = Callable[[], contextlib.AbstractContextManager[Any]]


def _run_epoch(
    model: MUPNet,
    loader: Iterable[LoaderBatch],
    optimizer: torch.optim.Optimizer,
    weights: LossWeights,
    precision: Precision = contextlib.nullcontext,
) -> EpochStats:
    stats = EpochStats()
    device = _device(model)
    for batch in loader:
        inputs, labels, _ = _unpack(batch, device)
        optimizer.zero_grad(set_to_none=True)
        if isinstance(inputs, FrozenEvidence):
            if any(
                p.requires_grad for p in (*model.trunks.parameters(), *model.add_ons.parameters(), model.prototypes)
            ):
                raise ValueError("frozen evidence trains the last layer only (paper stage 3)")
            logits, min_distances = model.last_layer(inputs.similarities), inputs.min_distances
        else:
            with precision():
                output = model(inputs)
            logits, min_distances = output.logits.float(), output.min_distances.float()
        terms = _loss_terms(model, logits, min_distances, labels, weights)
        terms.total.backward()
        optimizer.step()
        correct = int((logits.argmax(dim=1) == labels).sum())
        stats._add(terms, correct, int(labels.shape[0]))
    return stats._finish()


def train_joint_epoch(
    model: MUPNet,
    loader: Iterable[LoaderBatch],
    optimizer: torch.optim.Optimizer,
    *,
    warm: bool = False,
    weights: LossWeights = LossWeights(),
    precision: Precision = contextlib.nullcontext,
) -> EpochStats:
    """One epoch of paper stage 1 (or of the warm-up before it) with the full loss of eq. (6).

    Parameters
    ----------
    model
        The network; left in train mode with the stage's parameters trainable.
    loader
        Iterable of ``(images, labels)`` (a third item, the projection
        eligibility, is ignored here).
    optimizer
        Typically :func:`joint_optimizer`. Frozen parameters get no
        gradient, so Adam leaves them untouched even if listed.
    warm
        Train only the add-on layers and prototypes (trunks frozen).
    weights
        Loss coefficients.
    precision
        Context the forward pass runs in, e.g. bfloat16 autocast
        (``models.training.loop.mixed_precision``); the loss is taken in
        float32. Default: the parameters' own precision.
    """
    set_trainable(model, "warm" if warm else "joint")
    model.train()
    return _run_epoch(model, loader, optimizer, weights, precision)


def train_last_layer_epoch(
    model: MUPNet,
    loader: Iterable[LoaderBatch],
    optimizer: torch.optim.Optimizer,
    *,
    weights: LossWeights = LossWeights(),
) -> EpochStats:
    """One epoch of paper stage 3: only ``w_h`` is trained, with CE + the L1 term.

    The prototype terms of the loss are constant here (nothing upstream
    moves), so the gradient is that of CE + ``weights.l1`` * L1. The model
    runs in eval mode: in train mode batch norm would still update its
    running statistics and move the latent patches away from the
    prototypes that stage 2 just projected onto them. ``loader`` yields
    ``(images, labels)`` or, for the same updates without running the
    trunks again, ``(FrozenEvidence, labels)`` (:func:`frozen_evidence`,
    computed after the projection).
    """
    set_trainable(model, "last")
    model.eval()
    return _run_epoch(model, loader, optimizer, weights)


def joint_optimizer(
    model: MUPNet,
    *,
    warm: bool = False,
    trunk_lr: float = 2e-4,
    add_on_lr: float = 3e-3,
    prototype_lr: float = 3e-3,
    weight_decay: float = 1e-3,
    rate_scale: float = 1.0,
) -> torch.optim.Adam:
    """Adam for stage 1 (paper: Adam, weight decay 0.001).

    The paper gives one learning rate (0.001, divided by 10 every 5 epochs:
    use ``torch.optim.lr_scheduler.StepLR(opt, 5, 0.1)``) and says the
    weight decay applies to "batch normalization layers"; the authors'
    released script instead uses per-group rates (trunks 2e-4, add-on 3e-3,
    prototypes 3e-3; warm-up add-on 2e-3) and decays the trunk and add-on
    weights, not the prototypes. We default to the script's groups since
    they are what produced the published model; pass other rates to follow
    the text. With ``warm`` the trunk group is left out. ``rate_scale``
    multiplies every rate (0.1: the paper's rate after one of its tenfold
    decays, for the joint epochs between repeated projections).
    """
    groups: list[dict[str, Any]] = []
    if not warm:
        groups.append(
            {"params": list(model.trunks.parameters()), "lr": rate_scale * trunk_lr, "weight_decay": weight_decay}
        )
    groups.append(
        {"params": list(model.add_ons.parameters()), "lr": rate_scale * add_on_lr, "weight_decay": weight_decay}
    )
    groups.append({"params": [model.prototypes], "lr": rate_scale * prototype_lr, "weight_decay": 0.0})
    return torch.optim.Adam(groups)


def last_layer_optimizer(model: MUPNet, lr: float = 1e-3) -> torch.optim.Adam:
    """Adam over ``w_h`` only (paper stage 3; lr 1e-3 as in the paper and the authors' script)."""
    return torch.optim.Adam(model.last_layer.parameters(), lr=lr)


# ---------------------------------------------------------------------------------------------------------------------
# Prototype projection (paper stage 2)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ProjectionRecord:
    """Where every prototype came from after :func:`project_prototypes` (index ``g = m * P + j``).

    Attributes
    ----------
    prototype_class
        ``(M*P,)`` class of each prototype.
    source_index
        ``(M*P,)`` index of the source sample in the loader's iteration
        order (counting all samples, eligible or not).
    position
        ``(M*P, 2)`` latent ``(row, col)`` of the source patch.
    distance
        ``(M*P,)`` squared distance the prototype moved (its distance to
        the patch before projection; 0 to the patch afterwards).
    receptive_field_box
        ``(M*P, 4)`` half-open ``(y0, x0, y1, x1)`` pixels of the patch's
        theoretical receptive field, clipped to the image. For a ResNet-18
        on a 224-300 px image this is most of the image.
    activation_box
        ``(M*P, 4)`` half-open box of the pixels where the source image's
        similarity map to the prototype, bilinearly upsampled to the image,
        reaches its 95th percentile: ProtoPNet's "prototypical part", the
        patch to show a radiologist.
    image_size
        ``(H, W)`` of the input images the boxes refer to.
    """

    prototype_class: torch.Tensor
    source_index: torch.Tensor
    position: torch.Tensor
    distance: torch.Tensor
    receptive_field_box: torch.Tensor
    activation_box: torch.Tensor
    image_size: tuple[int, int]
    modalities: int

    def as_dicts(self) -> list[dict[str, Any]]:
        """One JSON-ready dictionary per prototype (for model cards and the serving explanation)."""
        per_modality = self.prototype_class.shape[0] // self.modalities
        rows: list[dict[str, Any]] = []
        for g in range(self.prototype_class.shape[0]):
            rows.append(
                {
                    "prototype": g,
                    "modality": g // per_modality,
                    "class": int(self.prototype_class[g]),
                    "source_index": int(self.source_index[g]),
                    "position": [int(v) for v in self.position[g]],
                    "distance": float(self.distance[g]),
                    "receptive_field_box": [int(v) for v in self.receptive_field_box[g]],
                    "activation_box": [int(v) for v in self.activation_box[g]],
                    "image_size": list(self.image_size),
                }
            )
        return rows


def _activation_box(
    similarity_map: torch.Tensor, size: tuple[int, int], percentile: float
) -> tuple[int, int, int, int]:
    """Half-open box of the upsampled ``(h, w)`` map's pixels at or above ``percentile``."""
    upsampled = F.interpolate(similarity_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    threshold = torch.quantile(upsampled.flatten(), percentile / 100.0)
    rows, cols = torch.nonzero(upsampled >= threshold, as_tuple=True)
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


def _eligibility(eligible: torch.Tensor | None, batch: int, modalities: int, device: torch.device) -> torch.Tensor:
    """``(B, M)`` boolean candidate mask from ``None``, ``(B,)`` or ``(B, M)``."""
    if eligible is None:
        return torch.ones(batch, modalities, dtype=torch.bool, device=device)
    if eligible.dim() == 1:
        return eligible[:, None].expand(batch, modalities)
    if eligible.shape != (batch, modalities):
        raise ValueError(
            f"eligibility mask must be (B,) or (B, M) = ({batch}, {modalities}), got {tuple(eligible.shape)}"
        )
    return eligible


@dataclass
class _Candidate:
    """One training image's nearest latent patch to one prototype."""

    distance: float
    sample: int
    group: object  # the source's patient (or the sample itself): no two prototypes of a modality share one
    row: int
    col: int
    patch: torch.Tensor  # (C,) the latent vector the prototype becomes
    own_map: torch.Tensor  # (h, w) log similarity of the source image to that vector


def _keep_nearest(pool: list[_Candidate], new: list[_Candidate], keep: int) -> list[_Candidate]:
    """The ``keep`` nearest of ``pool + new``, one per group; ``sample`` breaks ties, so the earliest wins."""
    nearest: list[_Candidate] = []
    groups: set[object] = set()
    for candidate in sorted(pool + new, key=lambda c: (c.distance, c.sample)):
        if candidate.group not in groups:
            groups.add(candidate.group)
            nearest.append(candidate)
    return nearest[:keep]


@torch.no_grad()
def project_prototypes(
    model: MUPNet,
    loader: Iterable[Sequence[torch.Tensor]],
    percentile: float = ACTIVATION_PERCENTILE,
    distinct_sources: bool = True,
    source_groups: Sequence[object] | None = None,
) -> ProjectionRecord:
    """Paper stage 2: replace each prototype by its nearest latent training patch of its own class.

    Parameters
    ----------
    model
        Run in eval mode (restored afterwards) so that the latent patches
        are the ones inference will see.
    loader
        Iterable of ``(images, labels)`` or ``(images, labels, eligible)``
        over the projection set, in a fixed order (``shuffle=False``) so
        that :attr:`ProjectionRecord.source_index` identifies the sample.
        ``eligible`` (boolean, ``(B,)`` or ``(B, M)`` per modality) limits
        the candidates, e.g. to the paper's BI-RADS subsets
        (:func:`projection_eligibility`); a prototype of class ``k`` in
        modality ``m`` only considers samples with label ``k`` and
        ``eligible[:, m]``.
    percentile
        Threshold of the activation box (95 as in ProtoPNet).
    distinct_sources
        Give every prototype of a modality a different source image. The
        paper (and ProtoPNet) project each prototype onto its nearest
        patch independently, so two prototypes can land on the same patch
        and show a radiologist the same case twice, as two of the 0.2.0
        model's pairs did. With this on, prototypes are assigned in order
        of their nearest distance, and each takes the nearest patch of a
        source no earlier prototype of its modality took. Where a class has
        fewer eligible sources than prototypes, the last ones fall back to
        their nearest patch, shared or not. ``False``: the paper's rule.
    source_groups
        With ``distinct_sources``, the patient of every sample in loader
        order (any hashable): two images of one patient, such as both
        breasts or two copies of one scan, count as one source. ``None``:
        every image is its own source.

    Raises
    ------
    ValueError
        If some prototype has no eligible candidate: leaving it in place
        would present an unprojected, meaningless vector as a case.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    modalities, per_modality = model.modalities, model.prototypes_per_modality
    count = modalities * per_modality
    # One source serves at most one prototype, so the per_modality nearest sources always leave one free.
    keep = per_modality if distinct_sources else 1
    group_of = (lambda sample: source_groups[sample]) if source_groups is not None else (lambda sample: sample)
    pools: list[list[list[_Candidate]]] = [[[] for _ in range(per_modality)] for _ in range(modalities)]
    proto_class = model.prototype_class.reshape(modalities, per_modality)
    image_size = (0, 0)
    seen = 0
    try:
        for batch in loader:
            images, labels, eligible = _unpack(batch, device)
            if not isinstance(images, torch.Tensor):
                raise TypeError("projection searches the images' latent patches, not frozen evidence")
            size, image_size = images.shape[0], (int(images.shape[-2]), int(images.shape[-1]))
            latent = model.latent(images)
            distances = model.activations(latent).distance_maps  # (B, M, P, h, w)
            width = distances.shape[-1]
            allowed = _eligibility(eligible, size, modalities, device)
            candidate = (labels[:, None, None] == proto_class[None]) & allowed[:, :, None]  # (B, M, P)
            masked = distances.masked_fill(~candidate[..., None, None], math.inf)
            per_image, where = masked.flatten(-2).min(dim=-1)  # (B, M, P): each image's nearest patch
            for m in range(modalities):
                for j in range(per_modality):
                    nearest = torch.argsort(per_image[:, m, j], stable=True)[:keep]
                    fresh = []
                    for b in nearest.tolist():
                        if not math.isfinite(float(per_image[b, m, j])):
                            break
                        row, col = divmod(int(where[b, m, j]), width)
                        patch = latent[b, m, :, row, col].clone()
                        # Map of the source image against the patch itself, i.e. against the prototype after projection.
                        own = (latent[b, m] - patch[:, None, None]).pow(2).sum(dim=0)
                        own_map = torch.log((own + 1.0) / (own + model.epsilon))
                        fresh.append(
                            _Candidate(
                                float(per_image[b, m, j]), seen + b, group_of(seen + b), row, col, patch, own_map
                            )
                        )
                    pools[m][j] = _keep_nearest(pools[m][j], fresh, keep)
            seen += size
        missing = [(m, j) for m in range(modalities) for j in range(per_modality) if not pools[m][j]]
        if missing:
            names = ", ".join(f"modality {m} prototype {j} (class {int(proto_class[m, j])})" for m, j in missing)
            raise ValueError(f"no eligible projection candidate for {names}")
        chosen = _assign_sources(pools)
        vectors = model.prototypes.detach().clone()
        source = torch.zeros(count, dtype=torch.long)
        position = torch.zeros(count, 2, dtype=torch.long)
        distance = torch.zeros(count)
        rf_box = torch.zeros(count, 4, dtype=torch.long)
        act_box = torch.zeros(count, 4, dtype=torch.long)
        for m in range(modalities):
            for j in range(per_modality):
                pick, g = chosen[m][j], m * per_modality + j
                vectors[m, j] = pick.patch
                source[g], distance[g] = pick.sample, pick.distance
                position[g] = torch.tensor([pick.row, pick.col])
                rf_box[g] = torch.tensor(model.receptive_field.box(pick.row, pick.col, *image_size))
                act_box[g] = torch.tensor(_activation_box(pick.own_map, image_size, percentile))
        model.prototypes.copy_(vectors)
    finally:
        model.train(was_training)
    return ProjectionRecord(
        prototype_class=model.prototype_class.detach().cpu().clone(),
        source_index=source,
        position=position,
        distance=distance,
        receptive_field_box=rf_box,
        activation_box=act_box,
        image_size=image_size,
        modalities=modalities,
    )


def _assign_sources(pools: list[list[list[_Candidate]]]) -> list[list[_Candidate]]:
    """Per modality, nearest prototype first: each takes its nearest candidate whose source is still free."""
    chosen: list[list[_Candidate]] = []
    for modality in pools:
        taken: set[object] = set()
        picks: dict[int, _Candidate] = {}
        for j in sorted(range(len(modality)), key=lambda k: (modality[k][0].distance, k)):
            pick = next((c for c in modality[j] if c.group not in taken), modality[j][0])
            taken.add(pick.group)
            picks[j] = pick
        chosen.append([picks[j] for j in range(len(modality))])
    return chosen


def _normalise_birads(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower().replace("bi-rads", "").replace("birads", "").strip()
    return text or None


def projection_eligibility(
    birads: Sequence[str | None],
    labels: Sequence[int] | torch.Tensor,
    modalities: Sequence[str] = PAPER_MODALITIES,
    rules: dict[str, tuple[frozenset[str], frozenset[str]]] | None = None,
) -> torch.Tensor:
    """``(B, M)`` candidate mask for :func:`project_prototypes` from BI-RADS and pathology labels.

    A sample is a candidate in modality ``m`` when its label is benign (0)
    and its BI-RADS is in the benign set of ``m``, or malignant (1) and in
    the malignant set (default :data:`PAPER_PROTOTYPE_BIRADS`). Unknown
    BI-RADS (``None``) is never a candidate.
    """
    table = PAPER_PROTOTYPE_BIRADS if rules is None else rules
    label_list = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    if len(label_list) != len(birads):
        raise ValueError("birads and labels must have the same length")
    mask = torch.zeros(len(label_list), len(modalities), dtype=torch.bool)
    for i, (category, label) in enumerate(zip(birads, label_list, strict=False)):
        normalised = _normalise_birads(category)
        for m, modality in enumerate(modalities):
            sets = table[modality]
            mask[i, m] = normalised is not None and label < len(sets) and normalised in sets[label]
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


class MUPNetExportWrapper(nn.Module):
    """Everything the explanation needs, as plain tensors, for ONNX export.

    ``forward(images)`` with ``images`` ``(B, M, C, H, W)`` returns, in the
    order of :data:`EXPORT_OUTPUT_NAMES`:

    * ``logits`` ``(B, K)``;
    * ``similarities`` ``(B, M*P)``, eq. (2);
    * ``contributions`` ``(B, K, M*P)``: ``s_g * w_h[k, g]`` toward every
      class ``k``; row ``k`` sums to ``logits[:, k]`` (no bias), so the
      server can show contributions toward the predicted or the malignant
      class without a second run;
    * ``similarity_maps`` ``(B, M*P, H, W)`` bilinearly upsampled to the
      input size when ``upsample_maps`` (the default), else ``(B, M*P, h, w)``
      at latent resolution.

    Export at the fixed spatial size the model will serve (``top_k`` is
    clipped to the latent size at trace time); the batch axis may be dynamic.
    """

    def __init__(self, model: MUPNet, upsample_maps: bool = True) -> None:
        super().__init__()
        self.model = model
        self.upsample_maps = upsample_maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.model(images)
        contributions = output.similarities[:, None, :] * self.model.last_layer.weight[None, :, :]
        maps = output.similarity_maps
        if self.upsample_maps:
            maps = F.interpolate(
                maps, size=(int(images.shape[-2]), int(images.shape[-1])), mode="bilinear", align_corners=False
            )
        return output.logits, output.similarities, contributions, maps


def export_onnx(
    model: MUPNet,
    destination: str | Path,
    image_size: int | tuple[int, int] = 224,
    opset: int = 17,
    upsample_maps: bool = True,
) -> Path:
    """Export :class:`MUPNetExportWrapper` (eval mode, fp32, dynamic batch) to ``destination``."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    wrapper = MUPNetExportWrapper(model, upsample_maps=upsample_maps).eval()
    dummy = torch.zeros(1, model.modalities, model.in_channels, height, width, device=_device(model))
    path = Path(destination)
    return export_graph(wrapper, (dummy,), path, EXPORT_INPUT_NAMES, EXPORT_OUTPUT_NAMES, opset, dynamic_batch=True)


def iterate_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, eligible: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Minimal in-memory loader (fixed order) yielding ``(images, labels[, eligible])`` batches."""
    for start in range(0, images.shape[0], batch_size):
        part = slice(start, start + batch_size)
        if eligible is None:
            yield images[part], labels[part]
        else:
            yield images[part], labels[part], eligible[part]
