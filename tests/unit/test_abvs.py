"""ABVS three-plane family (Liu et al., Theranostics 2025): fusion, Grad-CAM, export, planes, synthetic volumes.

Small on purpose: ResNet-18 trunks, 64x64 planes, one thread.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the ABVS family needs the train extra (make train-venv)")
pytest.importorskip("monai", reason="the ABVS family needs the train extra (make train-venv)")

from torch import nn

from models.datasets import load_records, read_gray, read_mask
from models.families.abvs.network import (
    EXPORT_INPUT_NAMES,
    EXPORT_OUTPUT_NAMES,
    MALIGNANT,
    ThreePlaneClassifier,
    ThreePlaneExportWrapper,
    analytic_plane_cams,
    average_frame_probabilities,
    box_centre,
    decide,
    export_onnx,
    extract_frames,
    extract_planes,
    frame_offsets,
    grad_cam,
    lesion_centre,
    malignancy_probabilities,
    rectify_and_normalise,
    volume_box,
)
from models.training.abvs_volumes import (
    build_volume,
    central_lesion_centre,
    planes_dataset,
)

torch.set_num_threads(1)

SIZE = 64
DEPTH = 18
DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture(scope="module")
def model() -> ThreePlaneClassifier:
    torch.manual_seed(0)
    network = ThreePlaneClassifier(backbone_depth=DEPTH)
    network.eval()
    return network


def _planes(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 1, SIZE, SIZE, generator=generator) for _ in range(3))  # type: ignore[return-value]


class _Constant(nn.Module):
    """Stands in for a trunk: ignores the image and returns known features."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.features


# --- network ----------------------------------------------------------------------------


def test_output_and_feature_shapes(model: ThreePlaneClassifier) -> None:
    t, s, c = _planes()
    with torch.no_grad():
        logits, maps = model.forward_with_features(t, s, c)
        assert torch.equal(model(t, s, c), logits)
        # Pooling before fusion lets the planes' ROIs differ in size.
        odd = model(t, torch.randn(2, 1, 48, 80), torch.randn(2, 1, 96, 64))
    assert logits.shape == (2, 2) and odd.shape == (2, 2)
    assert [tuple(m.shape) for m in maps] == [(2, 512, 2, 2)] * 3
    assert model.reduce.in_features == 1024 and model.reduce.out_features == 512 and model.output.out_features == 2


def test_paper_head_widths_for_resnet50() -> None:
    network = ThreePlaneClassifier()  # ResNet-50 per plane, as in the paper
    assert network.feature_channels == 2048
    assert (network.reduce.in_features, network.reduce.out_features) == (4096, 2048)  # FC to half the fused width
    assert (network.output.in_features, network.output.out_features) == (2048, 2)
    assert isinstance(network.act, nn.ReLU)


def test_head_input_is_sum_of_transverse_and_sagittal_concatenated_with_coronal(model: ThreePlaneClassifier) -> None:
    torch.manual_seed(3)
    known = [torch.randn(2, 512, 3, 3) for _ in range(3)]
    stubbed = ThreePlaneClassifier(backbone_depth=DEPTH).eval()
    stubbed.load_state_dict(model.state_dict())
    stubbed.transverse, stubbed.sagittal, stubbed.coronal = (_Constant(f) for f in known)
    seen: list[torch.Tensor] = []
    stubbed.reduce.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        logits = stubbed(*_planes())
    t, s, c = (f.mean(dim=(2, 3)) for f in known)
    expected = torch.cat([t + s, c], dim=1)
    assert torch.allclose(seen[0], expected, atol=1e-6)
    manual = model.output(torch.relu(model.reduce(expected)))
    assert torch.allclose(logits, manual, atol=1e-6)

    # The same on the real trunks, their outputs caught by hooks.
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
        for name in EXPORT_INPUT_NAMES
    ]
    handles.append(model.reduce.register_forward_pre_hook(lambda module, args: outputs.__setitem__("head", args[0])))
    try:
        with torch.no_grad():
            model(*_planes())
    finally:
        for handle in handles:
            handle.remove()
    pooled = {name: outputs[name].mean(dim=(2, 3)) for name in EXPORT_INPUT_NAMES}
    assert torch.allclose(
        outputs["head"], torch.cat([pooled["transverse"] + pooled["sagittal"], pooled["coronal"]], 1), atol=1e-6
    )


def test_transverse_and_sagittal_are_interchangeable_but_coronal_is_not(model: ThreePlaneClassifier) -> None:
    with torch.no_grad():
        ft, fs, fc = model.plane_features(*_planes())
        base = model.logits_from_features(ft, fs, fc)
        assert torch.equal(model.logits_from_features(fs, ft, fc), base)
        assert not torch.allclose(model.logits_from_features(fc, fs, ft), base, atol=1e-4)
        assert not torch.allclose(model.logits_from_features(ft, fc, fs), base, atol=1e-4)

    # Each plane has its own trunk, so image-level symmetry needs the two trunks to be equal.
    twin = ThreePlaneClassifier(backbone_depth=DEPTH).eval()
    twin.load_state_dict(model.state_dict())
    twin.sagittal.load_state_dict(twin.transverse.state_dict())
    t, s, c = _planes()
    with torch.no_grad():
        assert torch.allclose(twin(s, t, c), twin(t, s, c), atol=1e-6)
        assert not torch.allclose(twin(c, s, t), twin(t, s, c), atol=1e-4)


# --- decision ---------------------------------------------------------------------------


def test_frame_probabilities_are_averaged_and_thresholded_at_one_half() -> None:
    assert average_frame_probabilities([0.2, 0.6, 0.7]) == pytest.approx(0.5)
    assert average_frame_probabilities(np.array([0.9])) == pytest.approx(0.9)
    assert decide(0.5) == "benign"  # the paper: malignant when the mean *exceeds* 0.5
    assert decide(0.5 + 1e-9) == "malignant"
    assert decide(average_frame_probabilities([0.1, 0.95, 0.8])) == "malignant"
    assert decide(0.6, threshold=0.7) == "benign"
    for bad in ([], [0.3, 1.2], [float("nan")]):
        with pytest.raises(ValueError):
            average_frame_probabilities(bad)
    logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert np.allclose(malignancy_probabilities(logits), [0.5, 1 / (1 + np.exp(-2.0))])


# --- Grad-CAM ---------------------------------------------------------------------------


def _reference_grad_cam(
    model: ThreePlaneClassifier, planes: tuple[torch.Tensor, ...], class_index: int
) -> list[torch.Tensor]:
    """Textbook Grad-CAM through the whole network with .backward(), independent of the module's shortcut."""
    model.zero_grad()
    logits, maps = model.forward_with_features(*planes)
    for feature in maps:
        feature.retain_grad()
    logits[:, class_index].sum().backward()
    cams = []
    for feature in maps:
        assert feature.grad is not None
        cams.append((feature.grad.mean(dim=(2, 3), keepdim=True) * feature).sum(dim=1).detach())
    model.zero_grad()
    return cams


def test_grad_cam_matches_textbook_and_in_graph_cam(model: ThreePlaneClassifier) -> None:
    planes = _planes(seed=5)
    with torch.no_grad():
        maps = model.plane_features(*planes)
        logits, analytic = analytic_plane_cams(model, maps)
    for class_index in (0, MALIGNANT):
        raw = grad_cam(model, *planes, class_index=class_index, normalise=False)
        reference = _reference_grad_cam(model, planes, class_index)
        assert torch.allclose(raw.logits, logits, atol=1e-5)
        for ours, textbook, in_graph in zip(raw[1:], reference, analytic, strict=True):
            scale = float(textbook.abs().max())
            assert scale > 0
            assert torch.allclose(ours, textbook, atol=1e-5 * scale)
            assert torch.allclose(in_graph[:, class_index], textbook, atol=1e-5 * scale)
    normalised = grad_cam(model, *planes)
    for cam, in_graph in zip(normalised[1:], analytic, strict=True):
        assert cam.shape == (2, 2, 2) and float(cam.min()) >= 0 and float(cam.max()) <= 1 + 1e-6
        assert torch.allclose(cam, rectify_and_normalise(in_graph[:, MALIGNANT]), atol=1e-4)


def test_rectify_and_normalise_keeps_empty_maps_empty() -> None:
    cam = torch.tensor([[[-1.0, 2.0], [1.0, 0.0]], [[-1.0, -2.0], [-3.0, -4.0]]])
    out = rectify_and_normalise(cam)
    assert torch.allclose(out[0], torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))


def test_export_wrapper_refuses_training_mode() -> None:
    wrapper = ThreePlaneExportWrapper(ThreePlaneClassifier(backbone_depth=18, dropout=0.5).train())
    with pytest.raises(RuntimeError, match="eval mode"):
        wrapper(*_planes(batch=2))


def test_onnx_export_matches_pytorch(model: ThreePlaneClassifier, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(model, tmp_path / "abvs.onnx", size=SIZE, opset=17)
    graph = onnx.load(str(path), load_external_data=False)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {17}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(EXPORT_INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == list(EXPORT_OUTPUT_NAMES)
    planes = _planes(batch=3, seed=7)  # a batch size other than the traced one
    with torch.no_grad():
        expected = ThreePlaneExportWrapper(model)(*planes)
    got = session.run(
        list(EXPORT_OUTPUT_NAMES), {name: p.numpy() for name, p in zip(EXPORT_INPUT_NAMES, planes, strict=True)}
    )
    assert got[0].shape == (3, 2) and got[1].shape == (3, 2, 2, 2)
    for name, ours, theirs in zip(EXPORT_OUTPUT_NAMES, expected, got, strict=True):
        assert np.abs(ours.numpy() - theirs).max() < 1e-4, name
    # The exported map is the autograd Grad-CAM of the malignant class.
    autograd = grad_cam(model, *planes, normalise=False)
    for cam, exported in zip(autograd[1:], got[1:], strict=True):
        assert np.allclose(cam.numpy(), exported[:, MALIGNANT], atol=1e-4)


# --- planes through a volume ------------------------------------------------------------


def test_plane_extraction_picks_the_documented_axes() -> None:
    z, y, x = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")
    volume = 10000 * z + 100 * y + x  # every voxel names its own coordinates
    transverse, sagittal, coronal = extract_planes(volume, (2, 3, 4))
    assert transverse.shape == (6, 7) and np.all(transverse // 10000 == 2)
    assert np.array_equal(transverse, volume[2])
    assert sagittal.shape == (6, 5)  # rows depth (y), columns sweep (z)
    assert np.all(sagittal % 100 == 4) and np.array_equal(sagittal[:, 0], 100 * np.arange(6) + 4)
    assert np.array_equal(sagittal[1], 10000 * np.arange(5) + 100 + 4)
    assert coronal.shape == (5, 7)  # rows sweep (z), columns lateral (x)
    assert np.all((coronal // 100) % 100 == 3) and np.array_equal(coronal[:, 0], 10000 * np.arange(5) + 300)

    moved = extract_planes(volume, (2, 3, 4), offset=1)
    assert np.all(moved[0] // 10000 == 3) and np.all(moved[1] % 100 == 5) and np.all((moved[2] // 100) % 100 == 4)
    clipped = extract_planes(volume, (4, 5, 6), offset=3)
    assert np.all(clipped[0] // 10000 == 4) and np.all(clipped[1] % 100 == 6) and np.all((clipped[2] // 100) % 100 == 5)
    with pytest.raises(ValueError):
        extract_planes(volume, (5, 0, 0))

    assert frame_offsets(5) == [0, -1, 1, -2, 2]
    assert frame_offsets(2, step=3) == [0, -3]
    frames = extract_frames(volume, (2, 3, 4), count=3, step=1)
    assert [int(f[0][0, 0] // 10000) for f in frames] == [2, 1, 3]


def test_lesion_box_and_centre() -> None:
    mask = np.zeros((9, 10, 11), np.uint8)
    mask[2:7, 3:8, 4:9] = 1
    assert volume_box(mask) == (2, 3, 4, 5, 5, 5)
    assert box_centre((2, 3, 4, 5, 5, 5)) == (4, 5, 6)
    assert lesion_centre(mask) == (4, 5, 6)
    mask[3:6, 4:7, 5:8] = 0  # hollow: the box centre is not lesion, the centre must snap onto it
    centre = lesion_centre(mask)
    assert mask[centre] == 1
    assert volume_box(np.zeros((2, 2, 2))) is None


# --- synthetic volumes ------------------------------------------------------------------


def _image_and_mask(rows: int = 80, cols: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.normal(130, 30, (rows, cols)).clip(0, 255).astype(np.uint8), (5, 5), 1.5)
    mask = np.zeros((rows, cols), np.uint8)
    cv2.ellipse(mask, (cols // 2, rows // 2), (cols // 6, rows // 8), 10, 0, 360, 255, -1)
    image[mask > 0] //= 3
    return image, mask


def test_synthetic_volume_keeps_the_real_slice_and_sweeps_a_closed_lesion() -> None:
    image, mask = _image_and_mask()
    volume, lesion = build_volume(image, mask, depth=24, rng=3)
    assert volume.shape == lesion.shape == (24, 80, 100)
    assert volume.dtype == lesion.dtype == np.uint8 and set(np.unique(lesion)) == {0, 1}
    assert np.array_equal(volume[12], image) and np.array_equal(lesion[12], (mask > 0).astype(np.uint8))
    per_slice = lesion.sum(axis=(1, 2))
    assert per_slice[0] == 0 and per_slice[-1] == 0  # the lesion closes inside the volume
    assert per_slice.argmax() in range(10, 15) and per_slice[6] < per_slice[12]
    centre = central_lesion_centre(lesion)
    assert centre[0] == 12
    planes, masks = extract_planes(volume, centre), extract_planes(lesion, centre)
    assert all(m.any() for m in masks)
    # The lesion is dark in every plane, as it is in the real image.
    for plane, plane_mask in zip(planes, masks, strict=True):
        assert plane[plane_mask > 0].mean() < plane[plane_mask == 0].mean() - 20
    # Slices away from the centre are not copies of it.
    assert not np.array_equal(volume[11], volume[12]) and not np.array_equal(volume[3], volume[20])


def test_synthetic_volume_is_deterministic_and_resizes_the_mask() -> None:
    image, mask = _image_and_mask(300, 200)
    first = build_volume(image, mask, depth=16, rng=np.random.default_rng(11), max_side=64)
    again = build_volume(image, mask, depth=16, rng=11, max_side=64)
    other = build_volume(image, mask, depth=16, rng=12, max_side=64)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (16, 64, 43)
    expected = cv2.resize(mask, (43, 64), interpolation=cv2.INTER_NEAREST) > 0
    assert np.array_equal(first[1][8].astype(bool), expected)
    with pytest.raises(ValueError):
        build_volume(image, np.zeros_like(mask), depth=16, rng=0)


def _tiny_dataset(root: Path) -> Path:
    folder = root / "busi"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        for index, label in enumerate(("benign", "malignant", "normal")):
            image, mask = _image_and_mask()
            if label == "normal":
                mask[:] = 0
            name = f"case_{index}"
            cv2.imwrite(str(folder / "images" / f"{name}.png"), image)
            cv2.imwrite(str(folder / "masks" / f"{name}.png"), mask)
            writer.writerow([name, label])
    return root


def test_planes_dataset_yields_labelled_roi_triplets(tmp_path: Path, model: ThreePlaneClassifier) -> None:
    records = load_records(_tiny_dataset(tmp_path), ("busi",))
    samples = list(planes_dataset(records, size=SIZE, depth=24, frames=3, step=1, seed=4))
    assert [(s.image_id, s.label) for s in samples] == [("case_0", 0), ("case_1", 1)]  # the normal image is skipped
    for sample in samples:
        for plane in sample[:3]:
            assert plane.shape == (3, 1, SIZE, SIZE) and plane.dtype == np.float32
            assert np.allclose(plane.mean(axis=(1, 2, 3)), 0, atol=1e-4)  # z-scored per ROI, as serving does
    repeat = list(planes_dataset(records[::-1], size=SIZE, depth=24, frames=3, step=1, seed=4))
    assert np.array_equal(repeat[1].sagittal, samples[0].sagittal)  # same lesion, same seed, any order
    # Per-frame probabilities through the network, averaged per lesion.
    with torch.no_grad():
        logits = model(*(torch.from_numpy(p) for p in samples[0][:3]))
    probability = average_frame_probabilities(malignancy_probabilities(logits))
    assert 0.0 <= probability <= 1.0 and decide(probability) in ("benign", "malignant")


@pytest.mark.skipif(not (DATASETS / "busi" / "labels.csv").is_file(), reason="development datasets not present")
def test_real_lesions_become_volumes() -> None:
    records = [r for r in load_records(DATASETS, ("busi",)) if r.malignant is not None and r.mask_path is not None][:2]
    assert records
    for record in records:
        image = read_gray(record.image_path)
        mask = read_mask(record, image.shape)
        volume, lesion = build_volume(image, mask, depth=16, rng=0, max_side=96)
        rows, cols = volume.shape[1:]
        assert max(rows, cols) == 96
        expected = cv2.resize(mask, (cols, rows), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(lesion[8], expected)
        assert all(m.any() for m in extract_planes(lesion, central_lesion_centre(lesion)))
    samples = list(planes_dataset(records, size=SIZE, depth=16, frames=2, max_side=96))
    assert len(samples) == len(records)
    assert all(np.isfinite(s.coronal).all() and s.coronal.shape[1:] == (1, SIZE, SIZE) for s in samples)
