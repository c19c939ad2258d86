"""int8 convolution-weight storage: smaller files, the same served probabilities, an honest record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from models.families.onnx_export import _int8_per_channel, export_graph, int8_convolution_weights


class _SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.head = torch.nn.Linear(64, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(image), 1))


def test_per_channel_scales_fit_each_channel_and_round_trip_closely() -> None:
    rng = np.random.default_rng(0)
    weight = (
        rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
        * np.array([1.0, 0.01, 5.0, 0.0], dtype=np.float32)[:, None, None, None]
    )
    scale, quantised = _int8_per_channel(weight)
    assert quantised.dtype == np.int8 and scale.shape == (4, 1, 1, 1) and np.abs(quantised).max() <= 127
    restored = quantised.astype(np.float32) * scale
    for channel in range(3):  # each channel's error is a small part of its own range, whatever its magnitude
        assert np.abs(restored[channel] - weight[channel]).max() <= np.abs(weight[channel]).max() / 100
    assert np.all(restored[3] == 0.0)  # an all-zero channel stays zero, with no division by zero


def test_graph_is_smaller_and_serves_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = _SmallNet().eval()
    image = torch.randn(1, 1, 32, 32)
    path = export_graph(network, (image,), tmp_path / "float.onnx", ["image"], ["logits"])
    compressed, count = int8_convolution_weights(onnx.load(str(path)))
    assert count == 1  # the 32x1x3x3 stem (288 weights) is under the size floor; the 64x32x3x3 convolution is not
    onnx.save(compressed, str(tmp_path / "int8.onnx"))
    kinds = {init.name: init.data_type for init in compressed.graph.initializer}
    assert onnx.TensorProto.INT8 in kinds.values() and (tmp_path / "int8.onnx").stat().st_size < path.stat().st_size
    assert int8_convolution_weights(onnx.load(str(path)), min_elements=1)[1] == 2
    with torch.no_grad():
        reference = network(image).numpy()
    got = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image.numpy()}
    )[0]
    assert np.abs(got - reference).max() < 0.01 * np.abs(reference).max() + 1e-3
    assert not np.array_equal(got, reference)  # the weights really changed


def test_acceptance_is_on_the_served_probability_and_auc() -> None:
    from models.training.export_family import int8_storage

    labels = [0, 0, 1, 1]
    close = int8_storage(10, labels, [0.1, 0.2, 0.7, 0.8], [0.11, 0.19, 0.72, 0.8], "float")
    assert close["accepted"] and close["max_probability_shift"] == pytest.approx(0.02)
    moved = int8_storage(10, labels, [0.1, 0.2, 0.7, 0.8], [0.1, 0.2, 0.7, 0.9], "float")
    assert not moved["accepted"]  # one lesion's probability moved by 0.1
    reordered = int8_storage(10, labels, [0.10, 0.50, 0.49, 0.8], [0.10, 0.48, 0.51, 0.8], "float")
    assert reordered["val_auc_float"] == 0.75 and reordered["val_auc_int8"] == 1.0 and reordered["accepted"]
    worse = int8_storage(10, labels, [0.10, 0.48, 0.51, 0.8], [0.10, 0.50, 0.49, 0.8], "float")
    assert not worse["accepted"]  # small shifts, but the AUC dropped
