"""MUP-Net's serving graph: the image-only interface the scorer runs, with per-prototype contributions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.families.mupnet.network import MUPNet


class MUPNetServingWrapper(nn.Module):
    """MUP-Net (M = 1) behind the image-only serving interface.

    Outputs: ``logits``; ``contributions`` (B, P): every prototype's share
    of the malignancy log-odds, its similarity times its malignant-minus-benign
    last-layer weight. The layer has no bias (eq. 3), so the shares sum
    exactly to ``logits[:, 1] - logits[:, 0]``, the log-odds the probability
    is made of, and a positive share pushes toward malignant whichever class
    the prototype belongs to (0.2.0 graphs gave the malignant logit's shares,
    which leave out what the benign logit does); ``cam``: the similarity maps
    weighted the same way, the map of what moved the log-odds (a Grad-CAM
    equivalent for this linear head).
    """

    def __init__(self, model: MUPNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.model(image[:, None])
        weight = self.model.last_layer.weight
        toward_malignant = weight[1] - weight[0]
        contributions = output.similarities * toward_malignant[None, :]
        cam = torch.einsum("g,bghw->bhw", toward_malignant, output.similarity_maps)
        return output.logits, contributions, cam


def serving_graph(_model: nn.Module, work: Path) -> tuple[nn.Module, list[str], list[str]]:
    """The projected model the finish stage kept (``projected.pt``), not the network stage's best epoch."""
    projected = MUPNet(modalities=1)
    projected.load_state_dict(torch.load(work / "projected.pt", map_location="cpu", weights_only=False)["model"])
    return MUPNetServingWrapper(projected.eval()), ["image"], ["logits", "contributions", "cam"]
