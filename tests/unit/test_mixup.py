"""Mixup in the family training loop: the blend, its labels, one forward pass, and where it is refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from models.training import train_family  # noqa: E402


class _CountingNet(nn.Module):
    """Two-class linear network over a flattened crop that counts its forward passes; returns a tuple as the families do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(2 * 8 * 8, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        self.calls += 1
        return (self.linear(x.flatten(1)),)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 2, 8, 8, generator=generator), torch.tensor([0, 1, 0, 1, 1, 0])


def test_the_mixed_loss_is_the_label_blend_of_the_family_loss_on_the_blended_batch() -> None:
    spec = train_family.FAMILIES["dlr_bm"]
    x, y = _batch()
    net = _CountingNet()
    got = train_family.mixup_loss(spec, net, x, y, 0.4, np.random.default_rng(11))
    rng = np.random.default_rng(11)
    lam = float(rng.beta(0.4, 0.4))
    partner = torch.from_numpy(rng.permutation(6))
    mixed = lam * x + (1 - lam) * x[partner]
    logits = net.linear(mixed.flatten(1))
    expected = lam * nn.functional.cross_entropy(logits, y) + (1 - lam) * nn.functional.cross_entropy(logits, y[partner])
    assert 0.0 < lam < 1.0 and not torch.equal(partner, torch.arange(6))
    assert torch.allclose(got, expected, atol=1e-6)


def test_both_label_terms_share_one_forward_pass_and_one_backward_graph() -> None:
    spec = train_family.FAMILIES["dl_u"]  # DL-UM's focal loss over five block heads, called twice
    from models.families.dlum import network as dlum

    net = dlum.DLUMBranch(width=0.125)
    calls = {"n": 0}
    net.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    x = torch.randn(4, 1, 32, 32)
    loss = train_family.mixup_loss(spec, net, x, torch.tensor([0, 1, 1, 0]), 0.2, np.random.default_rng(0))
    loss.backward()
    assert calls["n"] == 1
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_check_mixup_refuses_prototypes_auxiliary_heads_and_negative_parameters() -> None:
    config = train_family.RunConfig(
        part="dl_u", family="dl_u", datasets="", work="", holdout="", epochs=1, batch_size=4, learning_rate=1e-3,
        input_size=32, seed=0, threads=1, max_minutes=float("inf"), bf16=False,
    )
    train_family.check_mixup(config)  # off: nothing to check
    train_family.check_mixup(replace(config, mixup=0.2))
    for bad in (
        replace(config, family="mupnet", mixup=0.2),
        replace(config, mixup=0.2, shape_aux=0.5),
        replace(config, mixup=0.2, birads_aux=0.5),
        replace(config, mixup=-0.1),
    ):
        with pytest.raises(ValueError):
            train_family.check_mixup(bad)
