"""Mask pretraining: where the decoder taps each family's network, what it predicts, and how a window is scored."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.errors import TrainingError
from models.training import mask_pretraining, pretrain
from models.training.train_family import FAMILIES


@pytest.mark.parametrize(
    ("family", "sizes"),
    [
        ("dl_u", [32, 16, 8, 4, 2]),  # five VGG19-style blocks, read before their max-pooling
        ("dlr_bm", [8, 8, 4, 2, 1]),  # ResNet stem (stride 4), then layer1 (same size) to layer4
        ("cldlr", [32, 16, 8, 4, 2]),  # VGG11: the ReLU before each max-pool, and the last one
        ("mupnet", [8, 8, 4, 2, 1]),  # its one ResNet-18 trunk, tapped like DLR's ResNet-50
    ],
)
def test_the_decoder_reads_every_resolution_stage_and_outlines_at_the_input_size(family: str, sizes: list[int]) -> None:
    model = mask_pretraining.MaskPretrainer(FAMILIES[family].build(), 32)
    image = torch.randn(2, 1, 32, 32)
    with mask_pretraining.tapped(model.stages) as features:
        model.body(image)
    assert [int(f.shape[-1]) for f in features] == sizes
    logits = model(image)
    assert logits.shape == (2, 1, 32, 32)
    logits.square().mean().backward()
    untouched = {name.split(".")[1] for name, p in model.named_parameters() if p.grad is None}
    # Only the classification heads (MUP-Net: the prototype layers) sit outside the path from the image to the mask;
    # every convolution on that path learns.
    assert untouched <= {"heads", "embed", "head", "fc1", "fc2", "out", "add_ons", "prototypes", "last_layer"}
    assert all(p.grad is not None for p in model.body.parameters() if p.dim() == 4)
    assert not any(module._forward_hooks for module in model.stages)  # the taps are removed after each pass


def test_refuses_a_network_whose_stages_it_does_not_know() -> None:
    from models.families.mupnet.network import MUPNet

    with pytest.raises(TrainingError, match="not MUPNet"):
        mask_pretraining.stage_modules(MUPNet(modalities=3))  # three trunks: which one would the mask teach?


def test_a_window_cuts_image_and_mask_alike() -> None:
    image = np.zeros((100, 200), np.uint8)
    image[40:60, 130:170] = 200
    mask = (image > 0).astype(np.uint8)
    item = pretrain.PretrainImage(image, (130, 40, 40, 20), mask)
    rng = np.random.default_rng(3)
    for _ in range(20):
        view, target = mask_pretraining.mask_window(item, pretrain.anchor_region(item, rng), FAMILIES["dl_u"], 48, rng)
        assert view.shape == target.shape == (1, 1, 48, 48)
        # DL-U scales each patch to [0, 1]: the bright lesion must sit exactly where its mask does.
        bright = view[0, 0] > 0.5
        assert target.sum() > 0 and (bright == (target[0, 0] > 0)).mean() > 0.97
    normal = pretrain.PretrainImage(image, None)
    assert not normal.lesion_mask().any()


def test_mean_dice_matches_hand_computed_values() -> None:
    class Fixed(torch.nn.Module):
        """Returns the next windows' logits, batch after batch."""

        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits
            self.served = 0

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            batch = self.logits[self.served : self.served + len(image)]
            self.served += len(image)
            return batch

    truth = torch.zeros(3, 1, 4, 4)
    truth[0, 0, :2, :2] = 1  # 4 pixels
    truth[1, 0, :, :2] = 1  # 8 pixels
    predicted = torch.full((3, 1, 4, 4), -1.0)
    predicted[0, 0, :2, :] = 1  # 8 pixels, 4 of them right: Dice 2*4/(8+4) = 2/3
    predicted[1, 0, :, :2] = 1  # exact: 1
    # third window: nothing predicted, nothing there: counts 1
    windows = mask_pretraining.ValidationWindows(torch.zeros(3, 1, 4, 4), truth)
    assert mask_pretraining.mean_dice(Fixed(predicted), windows, batch_size=2) == pytest.approx((2 / 3 + 1 + 1) / 3)  # type: ignore[arg-type]
