"""Seed-ensemble serving graph: the mean of its members, exported as one ONNX graph."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from models.errors import TrainingError
from models.families.dlum import network as dlum
from models.families.ensemble import MemberMean
from models.families.onnx_export import export_graph


def _branches(count: int) -> list[dlum.BranchExportWrapper]:
    branches = []
    for seed in range(count):
        torch.manual_seed(seed)
        branch = dlum.DLUMBranch(width=0.125).eval()
        for module in branch.modules():  # non-trivial batch-norm statistics, as after training
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        branches.append(dlum.BranchExportWrapper(branch).eval())
    return branches


def test_every_output_is_the_mean_of_the_members_outputs() -> None:
    members = _branches(3)
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        outputs = MemberMean(members)(image)
        singles = [member(image) for member in members]
    assert len(outputs) == 3
    for index, output in enumerate(outputs):
        expected = (singles[0][index] + singles[1][index] + singles[2][index]) / 3
        assert torch.allclose(output, expected, atol=1e-6)
    # Different seeds give different members, so the mean is not any one of them.
    assert not torch.allclose(outputs[0], singles[0][0], atol=1e-4)


def test_the_mean_cam_is_the_cam_of_the_mean_logit() -> None:
    """DL-U's CAM averages to its logit minus the head's bias; averaging members keeps that identity."""
    members = _branches(2)
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        logit, _, cam = MemberMean(members)(image)
        biases = []
        for member in members:
            head = member.branch.heads[-1]
            biases.append(float((head.fc2.weight @ head.fc1.bias + head.fc2.bias).item()))
    assert float(cam.mean()) + float(np.mean(biases)) == pytest.approx(float(logit.reshape(-1)[0]), abs=1e-4)


def test_members_with_different_outputs_are_refused() -> None:
    class One(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x,)

    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(ValueError, match="different numbers"):
        MemberMean([One(), Two()])(torch.zeros(1))
    with pytest.raises(ValueError, match="at least one"):
        MemberMean([])


def test_onnx_export_of_an_ensemble_matches_pytorch(tmp_path: Path) -> None:
    ensemble = MemberMean(_branches(2)).eval()
    image = torch.randn(1, 1, 64, 64)
    path = export_graph(ensemble, (image,), tmp_path / "ensemble.onnx", ["image"], ["logit", "block_logits", "cam"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        expected = ensemble(image)
    for served, reference in zip(got, expected, strict=False):
        assert np.abs(served - reference.numpy()).max() < 1e-4


def test_member_runs_get_their_own_folder_and_seed() -> None:
    from models.training.run_config import RunConfig, member_configs

    config = RunConfig(
        part="dl_u",
        family="dl_u",
        datasets="d",
        work="runs/x",
        holdout="",
        epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        input_size=32,
        seed=100,
        threads=1,
        max_minutes=1.0,
        bf16=False,
        ensemble=3,
    )
    members = member_configs(config)
    assert [(m.work, m.seed, m.ensemble) for m in members] == [
        (str(Path("runs/x/member-0")), 100, 1),
        (str(Path("runs/x/member-1")), 101, 1),
        (str(Path("runs/x/member-2")), 102, 1),
    ]
    assert member_configs(replace(config, ensemble=1)) == [replace(config, ensemble=1)]
    with pytest.raises(TrainingError, match="one network"):
        member_configs(replace(config, family="mupnet"))
    with pytest.raises(TrainingError, match="at least one"):
        member_configs(replace(config, ensemble=0))
