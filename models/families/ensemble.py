"""Seed ensembles: one family's network trained from K seeds, served as one graph.

Networks trained from scratch on about 1,500 lesions differ noticeably from
seed to seed; the mean of several such members is a standard way to cut
that variance (Lakshminarayanan et al. 2017, "Simple and scalable predictive
uncertainty estimation using deep ensembles"). The members keep the family's
architecture and recipe unchanged; only their initialisation and batch
order differ. Exporting the mean as one graph keeps the serving interface
(inputs, outputs, names, shapes) exactly that of a single member.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Families whose serving outputs can be averaged member by member. CLDLR's
#: SVMs and MUP-Net's projected prototypes belong to one network's feature
#: space, so a mean over members would not be the paper's model.
ENSEMBLE_FAMILIES = frozenset({"dl_u", "dl_u_lh", "dl_m", "dlr_bm", "dlr_lh"})


class MemberMean(nn.Module):
    """Element-wise mean of every output of K serving wrappers that share inputs and outputs.

    The first output of every supported family is a logit (DL-U / DL-M) or a
    pair of logits (DLR), so the ensemble's probability is the sigmoid or
    softmax of the members' mean logit. For DL-U / DL-M each member's CAM is
    linear in its features with the logit as its spatial mean plus a bias, so
    the mean CAM is exactly the CAM of the mean logit. DLR's closed-form
    Grad-CAM is ReLU-clipped per member; the mean of those maps is the mean of
    the members' explanations, not the Grad-CAM of the mean logit.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [member(*inputs) for member in self.members]
        if any(len(output) != len(outputs[0]) for output in outputs):
            raise ValueError("ensemble members return different numbers of outputs")
        return tuple(torch.stack(list(parts)).mean(dim=0) for parts in zip(*outputs, strict=False))
