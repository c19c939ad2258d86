"""DLR, CLDLR and DL-UM: shapes, closed-form explanations, losses, decision rules, ONNX parity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.families.cldlr import network as cldlr
from models.families.dlr import network as dlr
from models.families.dlum import network as dlum
from models.inference.decisions import Recommendation, average_frame_probabilities, co_decision

torch.set_num_threads(1)


def _autograd_gradcam(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    (gradient,) = torch.autograd.grad(target.sum(), features)
    weights = gradient.mean(dim=(2, 3))
    return torch.relu(torch.einsum("bc,bchw->bhw", weights, features))


def test_dlr_shapes_and_closed_form_gradcam_equals_autograd() -> None:
    torch.manual_seed(0)
    network = dlr.DLRNet(depth=18).eval()
    image = torch.randn(2, 1, 64, 64)
    logits, embedding, features = network(image)
    assert logits.shape == (2, 2) and embedding.shape == (2, dlr.EMBEDDING_SIZE) and features.shape == (2, 512, 2, 2)
    features = features.detach().requires_grad_(True)
    pooled = torch.flatten(network.pool(features), 1)
    head = network.head(network.act(network.embed(pooled)))
    expected = _autograd_gradcam(features, head[:, 1] - head[:, 0])
    assert torch.allclose(network.gradcam(features), expected, atol=1e-6)


def test_age_fusion_mlp_and_clinical_vector() -> None:
    assert dlr.clinical_vector(None) == [0.0, 0.0]
    assert dlr.clinical_vector(55) == [0.55, 1.0]
    mlp = dlr.AgeFusionMLP()
    assert mlp(torch.zeros(3, dlr.EMBEDDING_SIZE), torch.zeros(3, 2)).shape == (3, 2)


def test_cldlr_deep_features_and_gradcam_equals_autograd() -> None:
    torch.manual_seed(1)
    network = cldlr.VGG11Radiomics(width=0.125, hidden=32).eval()
    logits, deep, last_map = network(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 2) and deep.shape == (2, 32) and (deep >= 0).all()
    last_map = last_map.detach().requires_grad_(True)
    first = network.act(network.fc1(torch.flatten(network.pool(last_map), 1)))
    out = network.out(network.act(network.fc2(first)))
    expected = _autograd_gradcam(last_map, out[:, 1] - out[:, 0])
    assert torch.allclose(network.gradcam(last_map), expected, atol=1e-6)


def test_dlum_branch_blocks_and_exact_cam() -> None:
    torch.manual_seed(2)
    branch = dlum.DLUMBranch(width=0.125).eval()
    convolutions = [sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) for block in branch.blocks]
    assert convolutions == [2, 2, 4, 4, 4]
    # BN only after each block's last convolution; no max-pool after block 5.
    assert [sum(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules()) for block in branch.blocks] == [1] * 5
    block_logits, final, last_map = branch(torch.randn(2, 1, 64, 64))
    assert block_logits.shape == (2, 5) and final.shape == (2, branch.out_channels) and last_map.shape[-1] == 4
    # The head is affine, so the CAM's spatial mean plus the head's bias is exactly the logit.
    head = branch.heads[-1]
    bias = head.fc2(head.fc1.bias)[0] if head.fc1.bias is not None else head.fc2.bias[0]
    assert torch.allclose(branch.final_cam(last_map).mean(dim=(1, 2)) + bias, block_logits[:, -1], atol=1e-5)


def test_dlum_fusion_shapes_and_consistency_term() -> None:
    torch.manual_seed(3)
    network = dlum.DLUM(width=0.125).eval()
    fused, us_logits, mg_logits = network(torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64))
    assert fused.shape == (2,) and us_logits.shape == mg_logits.shape == (2, 5)
    targets = torch.tensor([0, 1])
    same = dlum.dlum_loss(fused, us_logits, us_logits, targets)
    different = dlum.dlum_loss(fused, us_logits, us_logits + 3.0, targets, consistency_weight=1.0)
    no_consistency = dlum.dlum_loss(fused, us_logits, us_logits + 3.0, targets, consistency_weight=0.0)
    expected_mae = (torch.sigmoid(us_logits[:, -1]) - torch.sigmoid(us_logits[:, -1] + 3.0)).abs().mean()
    assert torch.isclose(different - no_consistency, expected_mae, atol=1e-6)
    assert same < different


def test_focal_loss_known_values() -> None:
    # p = 0.5 for a positive: -0.25 * 0.5^2 * ln 0.5
    assert math.isclose(float(dlum.focal_loss(torch.zeros(1), torch.ones(1))), 0.25 * 0.25 * math.log(2), rel_tol=1e-6)
    # gamma = 0, alpha = 0.5 is half the binary cross-entropy
    logits, targets = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([1, 0, 0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
    assert torch.isclose(dlum.focal_loss(logits, targets, alpha=0.5, gamma=0.0), 0.5 * bce)
    # easy examples are down-weighted relative to cross-entropy
    assert dlum.focal_loss(
        torch.tensor([5.0]), torch.ones(1)
    ) < 0.01 * torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([5.0]), torch.ones(1))


@pytest.mark.parametrize(
    "lh,bm,expected",
    [
        (0.2, 0.1, Recommendation.DOWNGRADE),
        (0.9, 0.8, Recommendation.UPGRADE),
        (0.9, 0.1, Recommendation.KEEP),
        (0.2, 0.8, Recommendation.KEEP),
        (0.5, 0.5, Recommendation.UPGRADE),  # at the operating point counts as high / malignant
    ],
)
def test_four_a_co_decision(lh: float, bm: float, expected: Recommendation) -> None:
    decision = co_decision(lh, bm, lh_threshold=0.5, bm_threshold=0.5)
    assert decision.recommendation is expected


def test_segmenter_gives_one_logit_per_pixel_of_any_side_divisible_by_32() -> None:
    from models.families.segmentation.network import lesion_segmenter

    torch.manual_seed(0)
    network = lesion_segmenter().eval()
    with torch.no_grad():
        for rows, cols in ((64, 64), (96, 160)):
            assert network(torch.randn(2, 1, rows, cols)).shape == (2, 1, rows, cols)
    # Batch-norm momentum is PyTorch's 0.1, not MONAI's TensorFlow-style 0.01 (see lesion_segmenter).
    assert {m.momentum for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)} == {0.1}


def test_average_frame_probabilities() -> None:
    assert average_frame_probabilities([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        average_frame_probabilities([])


def _export(module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path) -> None:
    torch.onnx.export(
        module,
        tuple(inputs.values()),
        str(path),
        input_names=list(inputs),
        output_names=outputs,
        opset_version=18,
        dynamo=False,
    )


@pytest.mark.parametrize("family", ["dlr", "cldlr", "dl_u", "dl_um_fused", "us_segmenter"])
def test_onnx_export_matches_pytorch(family: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    from models.families.segmentation.network import SegmenterExportWrapper, lesion_segmenter

    torch.manual_seed(4)
    image = torch.randn(1, 1, 64, 64)
    wrapper: torch.nn.Module
    if family == "dl_um_fused":
        # Ships no weights (no paired US + MG data), but its card promises that the graph exports faithfully.
        wrapper = dlum.FusedExportWrapper(dlum.DLUM(width=0.125))
        inputs = {"us": image, "mg": torch.randn(1, 1, 64, 64)}
        outputs = ["fused_logit", "us_logit", "mg_logit", "us_cam", "mg_cam"]
    elif family == "us_segmenter":
        wrapper, inputs, outputs = SegmenterExportWrapper(lesion_segmenter()), {"image": image}, ["logits"]
    elif family == "dlr":
        wrapper = dlr.DLRExportWrapper(dlr.DLRNet(depth=18), dlr.AgeFusionMLP())
        inputs = {"image": image, "clinical": torch.tensor([[0.61, 1.0]])}
        outputs = ["logits", "image_logits", "cam"]
    elif family == "cldlr":
        wrapper = cldlr.CLDLRExportWrapper(cldlr.VGG11Radiomics(width=0.125, hidden=32))
        inputs, outputs = {"image": image}, ["logits", "deep_features", "cam"]
    else:
        wrapper = dlum.BranchExportWrapper(dlum.DLUMBranch(width=0.125))
        inputs, outputs = {"image": image}, ["logit", "block_logits", "cam"]
    wrapper.eval()
    _export(wrapper, inputs, outputs, tmp_path / "model.onnx")
    with torch.no_grad():
        result = wrapper(*inputs.values())
    expected = [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(outputs, {k: v.numpy() for k, v in inputs.items()})
    assert len(got) == len(expected) == len(outputs)
    for name, want, have in zip(outputs, expected, got, strict=False):
        assert have.shape == want.shape, name
        assert np.abs(have - want).max() < 1e-4, name


@pytest.mark.parametrize("family", ["dlr_lh", "dlr_bm", "cldlr", "dl_u", "dl_m", "mupnet"])
def test_the_recipe_is_the_one_the_shipped_model_was_trained_with(family: str) -> None:
    # `make train-FAMILY` must rebuild the bundled model's recipe, not a drifted one.
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest
    from models.training.train_family import FAMILIES

    spec, training = FAMILIES[family], read_manifest(BUNDLED_MODEL_DIR)[family].parameters["training"]
    assert (spec.epochs, spec.learning_rate, spec.batch_size) == (
        training["epochs"],
        training["learning_rate"],
        training["batch_size"],
    )
    # The shipped run's seed too: DLR_BM 0.8.0 was the better of two seeds, and the default rebuilt the other one.
    assert spec.seed == training["seed"]
    # MUP-Net's repeated stages; before 0.6.0 no export recorded them, and every family ran one cycle.
    assert (spec.push_cycles, spec.push_epochs) == (training.get("push_cycles", 1), training.get("push_epochs", 0))
    # Seed ensembles (absent: one network) and int8 convolution weights are part of the recipe too.
    assert spec.ensemble == (training.get("ensemble") or {}).get("members", 1)
    storage = read_manifest(BUNDLED_MODEL_DIR)[family].parameters.get("weight_storage") or {}
    assert spec.int8_weights == bool(storage.get("accepted"))
    # The version an export writes (and every SR then reports) is the recipe's release; compress_weights marks its
    # int8 copy of the same network with "+int8".
    assert read_manifest(BUNDLED_MODEL_DIR)[family].version.removesuffix("+int8") == spec.version


def test_the_second_lh_network_is_dl_u_recipe_on_dlr_lh_labels() -> None:
    # dl_u_lh (opt-in, not bundled, so the test above cannot hold it to a shipped model) is DL-U's recipe on LH's data.
    from models.training.train_family import FAMILIES

    lh, dl_u, dlr_lh = FAMILIES["dl_u_lh"], FAMILIES["dl_u"], FAMILIES["dlr_lh"]
    assert (lh.task, lh.datasets) == (dlr_lh.task, dlr_lh.datasets) == ("birads_high", ("busbra", "breast_lesions"))
    assert (lh.epochs, lh.learning_rate, lh.batch_size, lh.input_size, lh.roi) == (
        dl_u.epochs,
        dl_u.learning_rate,
        dl_u.batch_size,
        dl_u.input_size,
        dl_u.roi,
    )
    assert (lh.loss, lh.positive_probability) == (dl_u.loss, dl_u.positive_probability) and lh.ensemble == 2


def test_initialisation_names_what_the_start_checkpoint_came_from(tmp_path: Path) -> None:
    import json

    from models.inference.registry import sha256_of
    from models.training.export_family import initialisation
    from models.training.run_config import RunConfig

    def card_line(init: str) -> str:
        config = RunConfig(
            part="dlr_lh",
            datasets="d",
            work="w",
            epochs=1,
            batch_size=1,
            learning_rate=1e-3,
            input_size=32,
            seed=0,
            threads=1,
            max_minutes=1.0,
            bf16=False,
            family="dlr_lh",
            holdout="",
            init=init,
        )
        return initialisation(config)

    assert card_line("").startswith("random")
    family_run, masks, bare = (tmp_path / name for name in ("family", "masks", "bare"))
    for folder in (family_run, masks, bare):
        folder.mkdir()
        (folder / "best.pt").write_bytes(folder.name.encode())
    # A family run's config.json names its family; a mask run's its objective; a bare file says neither.
    (family_run / "config.json").write_text(json.dumps({"family": "dlr_bm", "epochs": 30}))
    (masks / "config.json").write_text(
        json.dumps({"family": "dl_u", "epochs": 30, "temperature": None, "objective": "masks"})
    )
    assert card_line(str(family_run / "best.pt")).startswith(
        "the network of dlr_bm trained by its own recipe (30 epochs"
    )
    assert "training split" in card_line(str(masks / "best.pt"))
    assert card_line(str(masks / "best.pt")).startswith(
        "mask pretraining of this network (models.training.mask_pretraining; 30 epochs"
    )
    assert card_line(str(bare / "best.pt")).startswith("a checkpoint of this network")
    assert sha256_of(family_run / "best.pt") in card_line(str(family_run / "best.pt"))
