"""DL-UM: ultrasound + mammography fusion with deep supervision (Xu et al., 2025).

Each branch is VGG19-style (paper, "Network architecture"): five blocks of
2, 2, 4, 4, 4 3x3 convolutions with 64, 128, 256, 512, 512 filters; the
last convolution of every block is followed by batch normalisation and
ReLU; blocks 1-4 end in 2x2 max-pooling, block 5 does not. After every
block a head (GAP -> FC 64 -> FC 1 -> sigmoid) is supervised (deep
supervision). The fused network concatenates the two branches' final GAP
features and classifies them with a head of the same form. Training uses
focal loss on every head plus a mean-absolute-error term that pulls the
US and MG branch predictions together.

The paper lists no activation between the head's two FC layers, so the
head is affine and its class-activation map is exact (Zhou et al. 2016):
``cam = (w2 W1) . F``, computed in the graph for every block.

The US-only (DL-U) and MG-only (DL-M) branches are models in their own
right: :class:`DLUMBranch` is served alone where only one modality exists.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

BLOCK_CONVOLUTIONS = (2, 2, 4, 4, 4)
BLOCK_FILTERS = (64, 128, 256, 512, 512)


class SupervisionHead(nn.Module):
    """GAP -> FC 64 -> FC 1 (the sigmoid is applied by the loss / at serving)."""

    def __init__(self, channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.fc2(self.fc1(torch.flatten(self.pool(features), 1)))
        return logit[:, 0]

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """Class-activation map of the logit: ``(w2 W1) . F`` per position, shape (B, H, W)."""
        weights = self.fc2.weight @ self.fc1.weight  # (1, C): the affine head collapsed
        return torch.einsum("c,bchw->bhw", weights[0], features)


def _block(in_channels: int, out_channels: int, convolutions: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for index in range(convolutions):
        layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
        if index == convolutions - 1:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        channels = out_channels
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class DLUMBranch(nn.Module):
    """One modality's VGG19-style branch with a supervision head after every block.

    Parameters
    ----------
    in_channels
        1 for grayscale patches.
    width
        Scales the filter counts (1.0 = the paper's 64..512); the CPU
        reference models use less and their cards say so.

    ``forward`` returns ``(block_logits (B, 5), final_features (B, C), last_map)``;
    the branch's own prediction is the last block's logit. Each head sees
    its block's activations before max-pooling, as in the paper's figure.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        filters = [max(8, round(f * width)) for f in BLOCK_FILTERS]
        blocks, heads = [], []
        channels = in_channels
        for convolutions, out_channels in zip(BLOCK_CONVOLUTIONS, filters, strict=False):
            blocks.append(_block(channels, out_channels, convolutions, pool=False))
            heads.append(SupervisionHead(out_channels))
            channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.pool = nn.MaxPool2d(2)
        self.out_channels = channels

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = []
        features = image
        for index, (block, head) in enumerate(zip(self.blocks, self.heads, strict=False)):
            features = block(features)
            logits.append(head(features))
            if index < len(self.blocks) - 1:
                features = self.pool(features)
        final = torch.flatten(functional.adaptive_avg_pool2d(features, 1), 1)
        return torch.stack(logits, dim=1), final, features

    def final_cam(self, last_map: torch.Tensor) -> torch.Tensor:
        """CAM of the branch's own (block-5) prediction."""
        head: SupervisionHead = self.heads[-1]  # type: ignore[assignment]
        return head.cam(last_map)


class DLUM(nn.Module):
    """The fused US + MG network: two branches, concatenated final GAP features, one head.

    ``forward(us, mg)`` returns ``(fused_logit (B,), us_block_logits (B, 5), mg_block_logits (B, 5))``.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        self.us = DLUMBranch(in_channels, width)
        self.mg = DLUMBranch(in_channels, width)
        self.fusion_head = nn.Sequential(nn.Linear(self.us.out_channels + self.mg.out_channels, 64), nn.Linear(64, 1))

    def forward(self, us: torch.Tensor, mg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        us_logits, us_final, _ = self.us(us)
        mg_logits, mg_final, _ = self.mg(mg)
        fused = self.fusion_head(torch.cat([us_final, mg_final], dim=1))[:, 0]
        return fused, us_logits, mg_logits


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al., TPAMI 2020), mean over the batch.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``. DL-UM does not state alpha
    and gamma; Lin et al.'s defaults (0.25, 2) are used.
    """
    targets = targets.to(logits.dtype)
    log_p = functional.logsigmoid(logits)
    log_not_p = functional.logsigmoid(-logits)
    log_p_t = targets * log_p + (1 - targets) * log_not_p
    p_t = torch.exp(log_p_t)
    alpha_t = targets * alpha + (1 - targets) * (1 - alpha)
    return (-alpha_t * (1 - p_t) ** gamma * log_p_t).mean()


def branch_loss(block_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Deep supervision: focal loss summed over the five block heads."""
    return sum(
        (focal_loss(block_logits[:, k], targets) for k in range(block_logits.shape[1])),
        block_logits.new_zeros((), dtype=torch.float32),
    )  # on the logits' device; float32 as before, so bf16 heads still sum in float32


def dlum_loss(
    fused_logit: torch.Tensor,
    us_logits: torch.Tensor,
    mg_logits: torch.Tensor,
    targets: torch.Tensor,
    consistency_weight: float = 1.0,
) -> torch.Tensor:
    """Focal loss on every head of both branches and on the fused head, plus MAE consistency.

    The consistency term is ``mean |sigmoid(us_final) - sigmoid(mg_final)|``
    over the two branches' own (block-5) predictions. The paper gives no
    weight for it; 1.0 is used.
    """
    consistency = (torch.sigmoid(us_logits[:, -1]) - torch.sigmoid(mg_logits[:, -1])).abs().mean()
    return (
        focal_loss(fused_logit, targets)
        + branch_loss(us_logits, targets)
        + branch_loss(mg_logits, targets)
        + consistency_weight * consistency
    )


class BranchExportWrapper(nn.Module):
    """DL-U or DL-M for serving: image in; the branch logit, all block logits and its CAM out."""

    def __init__(self, branch: DLUMBranch) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block_logits, _, last_map = self.branch(image)
        return block_logits[:, -1:], block_logits, self.branch.final_cam(last_map)


class FusedExportWrapper(nn.Module):
    """DL-UM for serving: US and MG patches in; fused and branch logits and both CAMs out."""

    def __init__(self, network: DLUM) -> None:
        super().__init__()
        self.network = network

    def forward(
        self, us: torch.Tensor, mg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        us_logits, us_final, us_map = self.network.us(us)
        mg_logits, mg_final, mg_map = self.network.mg(mg)
        fused = self.network.fusion_head(torch.cat([us_final, mg_final], dim=1))
        return (
            fused,
            us_logits[:, -1:],
            mg_logits[:, -1:],
            self.network.us.final_cam(us_map),
            self.network.mg.final_cam(mg_map),
        )
