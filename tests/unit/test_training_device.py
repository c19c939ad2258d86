"""Where the recipes train: the CPU by default here, a CUDA GPU where torch sees one (``--device``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from models.training.loop import device_of, mixed_precision, training_device  # noqa: E402
from tests.training_data import development_datasets, write_busbra_subset  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch on this machine")


def test_auto_takes_a_gpu_only_where_torch_sees_one() -> None:
    assert training_device("cpu") == torch.device("cpu")
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit, match="unknown training device"):
        training_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_cuda_without_one_says_why_instead_of_training_on_the_cpu() -> None:
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        training_device("cuda")


def test_mixed_precision_is_bf16_autocast_on_the_device_only_when_asked() -> None:
    layer = torch.nn.Linear(4, 2)
    x = torch.ones(3, 4)
    with mixed_precision(device_of(layer), True):
        assert layer(x).dtype == torch.bfloat16
    with mixed_precision(device_of(layer), False):
        assert layer(x).dtype == torch.float32


def _tiny_busbra(root: Path) -> Path:
    """Ten real BUS-BRA lesions, both classes in every split; training ones MUP-Net may project onto (BI-RADS 2/3 benign, 5 malignant)."""
    if not (development_datasets() / "busbra" / "labels.csv").is_file():
        pytest.skip("development datasets not found")
    picks = [(split, pathology, birads, count) for split, count in (("train", 3), ("val", 1), ("test", 1)) for pathology, birads in (("benign", ("2", "3")), ("malignant", ("5",)))]
    return write_busbra_subset(root, picks)


@pytest.mark.parametrize("family", ["dl_u", "mupnet"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_a_family_trains_on_the_device_and_exports_on_the_cpu(device: str, family: str, tmp_path: Path) -> None:
    from models.registry import read_manifest
    from models.training import train_family

    datasets = _tiny_busbra(tmp_path / "datasets")
    work, models = tmp_path / "work", tmp_path / "models"
    train_family.main(
        [family, "--datasets", str(datasets), "--work", str(work), "--output", str(models), "--device", device,
         "--epochs", "1", "--batch-size", "4", "--input-size", "32", "--threads", "1"]
    )
    assert json.loads((work / "config.json").read_text())["device"] == device
    # the weights were trained on the device (where torch saved them from), and load on the CPU, where the export ran
    saved_on: list[str] = []
    state = torch.load(work / "best.pt", map_location=lambda storage, location: saved_on.append(location) or storage, weights_only=False)["model"]
    assert saved_on and all(location.startswith(device) for location in saved_on)
    assert all(t.device.type == "cpu" for t in state.values())
    assert read_manifest(models)[family].parameters["max_abs_diff_fp32"] < 1e-3
    if family == "mupnet":  # the projection and last-layer cycles ran too, on the same device
        assert (work / "projected.pt").is_file() and json.loads((work / "finish.json").read_text())["cycles"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_mask_pretraining_and_the_segmenter_train_on_the_device(device: str, tmp_path: Path) -> None:
    from models.training import pretrain, train_reference

    datasets = _tiny_busbra(tmp_path / "datasets")
    pretrain.main(["dl_u", "--objective", "masks", "--datasets", str(datasets), "--work", str(tmp_path / "masks"), "--device", device,
                   "--epochs", "1", "--batch-size", "4", "--input-size", "32", "--threads", "1"])
    assert json.loads((tmp_path / "masks" / "config.json").read_text())["device"] == device
    assert 0.0 <= json.loads((tmp_path / "masks" / "train.log").read_text().splitlines()[0])["val_dice"] <= 1.0
    train_reference.main(["segmenter", "--datasets", str(datasets), "--work", str(tmp_path / "segmenter"), "--device", device,
                          "--epochs", "1", "--batch-size", "4", "--input-size", "64", "--threads", "1"])
    assert 0.0 <= json.loads((tmp_path / "segmenter" / "train.log").read_text().splitlines()[0])["val_dice_lesion_images"] <= 1.0
