"""DLR_LH and DLR_BM: two-stage BI-RADS re-stratification (Lu et al., QIMS 2025).

Both models share one architecture (paper, "Model construction"): a
ResNet-50 whose fully connected layer is replaced by two: a 128-d
embedding and a 2-way output. A small MLP then fuses the 128-d embedding
with the patient's age. DLR_LH separates BI-RADS 2/3 (low) from 4/5
(high); DLR_BM separates benign from malignant, trained on every lesion
with a pathology result (the paper's data_BM). Their joint reading of a
BI-RADS 4A lesion is :func:`models.inference.decisions.co_decision`.

Grad-CAM on this head is not a plain class-activation map (the head is
linear-ReLU-linear), but its gradient with respect to the pooled features
is available in closed form, so the exported graph computes true Grad-CAM
without autograd (:meth:`DLRNet.gradcam`).
"""

from __future__ import annotations

import torch
from torch import nn

from models.families.backbones import ResNetTrunk
from models.inference.family_scorer import age_inputs

EMBEDDING_SIZE = 128


class DLRNet(nn.Module):
    """ResNet trunk -> GAP -> FC(128) -> ReLU -> FC(2).

    ``forward`` returns ``(logits, embedding, feature_map)``.
    """

    def __init__(self, depth: int = 50, in_channels: int = 1, embedding_size: int = EMBEDDING_SIZE) -> None:
        super().__init__()
        self.trunk = ResNetTrunk(depth, in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(self.trunk.out_channels, embedding_size)
        self.act = nn.ReLU()
        self.head = nn.Linear(embedding_size, 2)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.trunk(image)
        embedding = self.act(self.embed(torch.flatten(self.pool(features), 1)))
        return self.head(embedding), embedding, features

    def gradcam(self, features: torch.Tensor) -> torch.Tensor:
        """Grad-CAM (Selvaraju et al. 2017) of the positive-class log-odds, in closed form.

        The target is ``logit[1] - logit[0]``. With ``p = GAP(F)``,
        ``z = W1 p + b1`` and ``t = (w2[1] - w2[0]) . relu(z)``, the
        gradient is ``dt/dF[c, i, j] = (W1^T (relu'(z) * (w2[1] - w2[0])))[c] / HW``:
        the same at every position, so it *is* Grad-CAM's channel weight.

        Returns
        -------
        torch.Tensor
            ReLU of the weighted feature sum, shape (B, H, W), unnormalised.
        """
        pooled = torch.flatten(self.pool(features), 1)
        active = torch.sign(torch.relu(self.embed(pooled)))  # relu'(z) without a cast: the graph stays fp16-convertible
        direction = self.head.weight[1] - self.head.weight[0]
        height, width = features.shape[-2:]
        weights = (active * direction) @ self.embed.weight / float(height * width)
        return torch.relu(torch.einsum("bc,bchw->bhw", weights, features))


class AgeFusionMLP(nn.Module):
    """The paper's MLP over ``[128-d embedding, age]``.

    Age is often absent from what a PACS sends (and from BUS-BRA), so it
    enters as two inputs, ``age / 100`` and a known flag; with the flag at
    0 the model runs on the image embedding alone and says so in the report.
    """

    def __init__(self, embedding_size: int = EMBEDDING_SIZE, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_size + 2, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2)
        )

    def forward(self, embedding: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.layers(torch.cat([embedding, clinical], dim=1))
        return result


def clinical_vector(age_years: float | None) -> list[float]:
    """The MLP's clinical input for one case: ``[age / 100, known]``, built as serving builds it.

    Only forwards to :func:`models.inference.family_scorer.age_inputs`, which the finish stage and the export call
    directly; kept for the tests that name it.
    """
    return age_inputs(age_years)


class DLRExportWrapper(nn.Module):
    """One ONNX graph per model: image + clinical in; fused logits, image logits, Grad-CAM out."""

    def __init__(self, network: DLRNet, mlp: AgeFusionMLP) -> None:
        super().__init__()
        self.network = network
        self.mlp = mlp

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_logits, embedding, features = self.network(image)
        return self.mlp(embedding, clinical), image_logits, self.network.gradcam(features)
