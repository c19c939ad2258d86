"""Where the recipes train: the CPU by default here, a CUDA GPU where torch sees one (``--device``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.errors import TrainingError
from models.training.loop import device_of, mixed_precision, training_device
from tests.training_data import development_datasets, write_busbra_subset

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch on this machine")


# One epoch of a tiny network on one thread: enough to run every stage of a recipe in seconds.
TINY_RUN = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--threads", "1"]


def test_auto_takes_a_gpu_only_where_torch_sees_one() -> None:
    assert training_device("cpu") == torch.device("cpu")
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainingError, match="unknown training device"):
        training_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_cuda_without_one_says_why_instead_of_training_on_the_cpu() -> None:
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        training_device("cuda")


def test_mixed_precision_is_bf16_autocast_on_the_device_only_when_asked() -> None:
    layer = torch.nn.Linear(4, 2)
    x = torch.ones(3, 4)
    with mixed_precision(device_of(layer), True):
        assert layer(x).dtype == torch.bfloat16
    with mixed_precision(device_of(layer), False):
        assert layer(x).dtype == torch.float32


def test_bf16_on_a_gpu_without_native_bf16_stops_instead_of_emulating(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(TrainingError, match=r"V100.*no native bfloat16"):
        mixed_precision(torch.device("cuda"), True)
    assert not mixed_precision(torch.device("cuda"), False)._enabled  # float32 there is fine


def _saved_on(checkpoint: Path, key: str = "model") -> list[str]:
    """Where torch saved each tensor of ``checkpoint[key]`` from ("cpu", "cuda:0"); loading happens on the CPU."""
    locations: list[str] = []
    torch.load(
        checkpoint, map_location=lambda storage, location: locations.append(location) or storage, weights_only=False
    )[key]
    return locations


@pytest.mark.parametrize("family", ["dl_u", "dlr_bm", "mupnet", "cldlr"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_each_family_loss_and_step_run_on_the_device_without_the_datasets(device: str, family: str) -> None:
    """A check that needs no data folder, so a GPU machine without one still runs it: every constant a loss builds
    must be on the inputs' device.
    """
    from models.training.loop import optimise_step
    from models.training.train_family import FAMILIES

    spec = FAMILIES[family]
    model = spec.build().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 1, spec.input_size, spec.input_size, device=device)
    y = torch.tensor([0, 1, 0, 1], device=device)
    native_bf16 = device == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False)
    with mixed_precision(torch.device(device), native_bf16):
        loss = spec.loss(model, x, y)
    assert loss.device.type == device and np.isfinite(optimise_step(optimizer, loss.float()))
    assert all(p.device.type == device for p in model.parameters())


def _tiny_busbra(root: Path) -> Path:
    """Ten real BUS-BRA lesions, both classes in every split; training ones MUP-Net may project onto (BI-RADS 2/3
    benign, 5 malignant).
    """
    if not (development_datasets() / "busbra" / "labels.csv").is_file():
        pytest.skip("development datasets not found")
    picks = [
        (split, pathology, birads, count)
        for split, count in (("train", 3), ("val", 1), ("test", 1))
        for pathology, birads in (("benign", ("2", "3")), ("malignant", ("5",)))
    ]
    return write_busbra_subset(root, picks)


@pytest.mark.parametrize("family", ["dl_u", "mupnet"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_a_family_trains_on_the_device_and_exports_on_the_cpu(device: str, family: str, tmp_path: Path) -> None:
    from models.inference.registry import read_manifest
    from models.training import train_family

    datasets = _tiny_busbra(tmp_path / "datasets")
    work, models = tmp_path / "work", tmp_path / "models"
    train_family.main(
        [
            family,
            "--datasets",
            str(datasets),
            "--work",
            str(work),
            "--output",
            str(models),
            "--device",
            device,
            *TINY_RUN,
        ]
    )
    assert json.loads((work / "config.json").read_text())["device"] == device
    # the weights were trained on the device (where torch saved them from), and load on the CPU, where the export ran
    saved_on = _saved_on(work / "best.pt")
    assert saved_on and all(location.startswith(device) for location in saved_on)
    state = torch.load(work / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert all(t.device.type == "cpu" for t in state.values())
    assert read_manifest(models)[family].parameters["max_abs_diff_fp32"] < 1e-3
    if family == "mupnet":  # the projection and last-layer cycles ran too, on the same device
        assert json.loads((work / "finish.json").read_text())["cycles"]
        assert all(location.startswith(device) for location in _saved_on(work / "projected.pt"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_mask_pretraining_and_the_segmenter_train_on_the_device(device: str, tmp_path: Path) -> None:
    from models.training import mask_pretraining, train_reference

    datasets = _tiny_busbra(tmp_path / "datasets")
    mask_pretraining.main(
        [
            "dl_u",
            "--datasets",
            str(datasets),
            "--work",
            str(tmp_path / "masks"),
            "--device",
            device,
            *TINY_RUN,
        ]
    )
    assert json.loads((tmp_path / "masks" / "config.json").read_text())["device"] == device
    assert 0.0 <= json.loads((tmp_path / "masks" / "train.log").read_text().splitlines()[0])["val_dice"] <= 1.0
    assert all(location.startswith(device) for location in _saved_on(tmp_path / "masks" / "last.pt"))
    train_reference.main(
        [
            "segmenter",
            "--datasets",
            str(datasets),
            "--work",
            str(tmp_path / "segmenter"),
            "--device",
            device,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--input-size",
            "64",
            "--threads",
            "1",
        ]
    )
    assert (
        0.0
        <= json.loads((tmp_path / "segmenter" / "train.log").read_text().splitlines()[0])["val_dice_lesion_images"]
        <= 1.0
    )
    assert all(location.startswith(device) for location in _saved_on(tmp_path / "segmenter" / "last.pt"))


def test_training_layout_is_channels_last_and_checkpoints_load_back_into_the_default_layout() -> None:
    """The NHWC layout is memory order only: a checkpoint of a network trained in it gives the same outputs in a fresh
    NCHW one.
    """
    from models.training.loop import to_training_device
    from models.training.train_family import FAMILIES

    torch.manual_seed(0)
    trained = to_training_device(FAMILIES["cldlr"].build(), torch.device("cpu")).eval()
    convolutions = [m.weight for m in trained.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    assert not all(
        w.is_contiguous() for w in convolutions
    )  # one input channel is both layouts at once; the rest are not
    fresh = FAMILIES["cldlr"].build().eval()
    fresh.load_state_dict(trained.state_dict())
    assert all(m.weight.is_contiguous() for m in fresh.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(trained(x)[0], fresh(x)[0], atol=1e-4)
    kept = to_training_device(torch.nn.Conv2d(4, 4, 3), torch.device("cpu"), channels_last=False)
    assert kept.weight.is_contiguous()  # the refiner's choice: instance norm is slower in NHWC
