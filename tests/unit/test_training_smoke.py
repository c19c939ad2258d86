"""Training recipes run end to end on a tiny dataset laid out like ``shared/datasets`` (needs the train extra)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch", reason="training needs the train extra (make train-venv)")
pytest.importorskip("monai", reason="training needs the train extra (make train-venv)")

from models.datasets import load_records
from models.training import train_reference


def _tiny_dataset(root: Path, count: int = 40) -> Path:
    """A 'busi'-style folder: images/, masks/, labels.csv, with dark ovals as lesions."""
    folder = root / "busi"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        for index in range(count):
            image = rng.normal(120, 20, (96, 128)).clip(0, 255).astype(np.uint8)
            mask = np.zeros((96, 128), np.uint8)
            cv2.ellipse(mask, (64, 48), (12 + index % 20, 12), 0, 0, 360, 255, -1)
            image[mask > 0] = 40
            name = f"busi_case_{index:03d}"
            cv2.imwrite(str(folder / "images" / f"{name}.png"), image)
            cv2.imwrite(str(folder / "masks" / f"{name}.png"), mask)
            writer.writerow([name, "malignant" if index % 2 else "benign"])
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = _tiny_dataset(tmp_path / "datasets")
    splits = {r.split for r in load_records(root, ("busi",))}
    if not {"train", "val"} <= splits:
        pytest.skip(f"hash split of the tiny set gave {splits}")
    return root


@pytest.mark.parametrize(
    "part,metric,size",
    [
        ("classifier", "val_auc", "32"),
        ("segmenter", "val_dice_lesion_images", "64"),
        ("refiner", "val_dice_windows", "64"),
    ],
)
def test_one_epoch_trains_checkpoints_and_logs(tiny: Path, tmp_path: Path, part: str, metric: str, size: str) -> None:
    work = tmp_path / part
    args = [
        part,
        "--datasets",
        str(tiny),
        "--work",
        str(work),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--input-size",
        size,
        "--threads",
        "1",
    ]
    try:
        train_reference.main(args)
    except ValueError as exc:  # AUC needs both classes in the tiny validation split
        if "positive and one negative" not in str(exc):
            raise
        pytest.skip("tiny validation split has one class only")
    assert (work / "last.pt").is_file() and (work / "best.pt").is_file()
    entry = json.loads((work / "train.log").read_text().splitlines()[0])
    assert entry["epoch"] == 0 and np.isfinite(entry["loss"]) and 0.0 <= entry[metric] <= 1.0
    assert json.loads((work / "config.json").read_text())["epochs"] == 1


def test_refiner_windows_follow_the_lesion_and_export_into_the_manifest(tiny: Path, tmp_path: Path) -> None:
    from models.inference.pipeline import load_refiner
    from models.inference.refine import refine_mask
    from models.inference.registry import read_manifest
    from models.training import export_reference

    records = [r for r in load_records(tiny, ("busi",)) if r.split == "train"]
    lesion = train_reference.lesion_images(records)[0]
    window, target = train_reference.refiner_pair(lesion, 48, None)
    assert window.shape == target.shape == (48, 48)
    assert 0.3 < target.mean() < 0.8  # the serving window: the lesion with a margin of a quarter of its box per side
    jittered = [train_reference.refiner_pair(lesion, 48, np.random.default_rng(seed))[1].mean() for seed in range(5)]
    assert len(set(np.round(jittered, 3))) > 1  # training windows vary as coarse boxes would
    work = tmp_path / "work"
    train_reference.main(
        [
            "refiner",
            "--datasets",
            str(tiny),
            "--work",
            str(work / "refiner"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--input-size",
            "48",
            "--threads",
            "1",
        ]
    )
    out = tmp_path / "models"
    export_reference.main(["--datasets", str(tiny), "--work", str(work), "--out", str(out), "--parts", "refiner"])
    entry = read_manifest(out)["us_refiner"]
    assert entry.parameters["input_size"] == 48 and entry.parameters["window_expand"] == 0.25
    assert entry.parameters["max_abs_logit_diff_fp32"] < 1e-3
    # Trained without --bf16: the record says fp32 (None), so the card's recipe line leaves the flag out.
    assert entry.parameters["training"] == {
        "epochs": 1,
        "batch_size": 4,
        "learning_rate": 2e-3,
        "seed": 20261121,
        "epochs_run": 1,
        "autocast": None,
    }
    refiner = load_refiner(out)
    assert refiner is not None
    mask = refine_mask(refiner[0], 48, lesion.image, lesion.mask.astype(bool))
    assert mask.shape == lesion.image.shape and mask.any()


@pytest.mark.parametrize("part", ["segmenter", "refiner"])
def test_the_segmentation_recipes_are_the_ones_the_shipped_models_were_trained_with(part: str) -> None:
    # `make train` must rebuild the bundled models' recipes. The refiner's 0.5.0 is the first export that recorded
    # its own; the segmenter's 0.1.0 record was read back from the commit that shipped it.
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest

    shipped = read_manifest(BUNDLED_MODEL_DIR)[f"us_{part}"].parameters
    recipe = train_reference.DEFAULTS[part]
    assert (recipe["epochs"], recipe["batch_size"], recipe["learning_rate"], recipe["input_size"]) == (
        shipped["training"]["epochs"],
        shipped["training"]["batch_size"],
        shipped["training"]["learning_rate"],
        shipped["input_size"],
    )
    assert shipped["training"]["seed"] == train_reference.DEFAULT_SEED
    assert shipped["train_epoch"] < shipped["training"]["epochs_run"] == shipped["training"]["epochs"]


@pytest.mark.parametrize("input_size", [128, 120])
def test_refiner_trains_without_zero_width_padding_and_computes_the_same(input_size: int) -> None:
    """Switching the decoder's pad off (sides divisible by 16 only) changes neither outputs nor gradients."""
    import torch
    from monai.networks.nets.basic_unet import UpCat

    from models.families.segmentation.network import lesion_refiner

    torch.manual_seed(0)
    default = lesion_refiner()
    fast = train_reference.without_zero_width_padding(lesion_refiner(), input_size)
    fast.load_state_dict(default.state_dict())
    stages = [m for m in fast.modules() if isinstance(m, UpCat)]
    assert stages and all(stage.is_pad == (input_size % 16 != 0) for stage in stages)
    x = torch.randn(2, 1, input_size, input_size)
    outputs = [network(x) for network in (default, fast)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for _network, output in zip((default, fast), outputs, strict=False):
        output.square().mean().backward()
    for a, b in zip(default.parameters(), fast.parameters(), strict=False):
        torch.testing.assert_close(a.grad, b.grad)
