"""The served ABVS three-plane scorer: its contract, its manifest kind, its checksum and its card.

Runs without torch: the scorer is driven through a recording backend and a tiny ONNX graph built here; only the
last test (plane crops of a synthetic volume) needs the train extra.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.errors import ManifestError, ModelRegistryError
from models.evaluation.three_plane import CARD_PATH, REPORT_PATH, three_plane_card
from models.inference.backend import Arrays
from models.inference.findings import ModelInfo
from models.inference.manifest import (
    ABVS_THREE_PLANE_ROLE,
    ModelKind,
    ScorerSpec,
    ThreePlaneSpec,
    parse_spec,
)
from models.inference.pipeline import default_families_of
from models.inference.registry import (
    BUNDLED_MODEL_DIR,
    MANIFEST_NAME,
    ModelEntry,
    read_manifest,
    sha256_of,
    write_manifest,
)
from models.inference.three_plane import ThreePlaneScorer, load_three_plane_scorer, malignancy_of

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32
PARAMETERS: dict[str, Any] = {
    "input_size": SIZE,
    "roi_expand": 0.1,
    "inputs": ["transverse", "sagittal", "coronal"],
    "outputs": ["logits", "cam_transverse", "cam_sagittal", "cam_coronal"],
    "operating_point": 0.5,
    "frames": 3,
    "frame_step": 2,
    "precision": "float32",
    "training": {"note": "provenance only"},
}


def _spec(**change: Any) -> ThreePlaneSpec:
    spec = parse_spec(ABVS_THREE_PLANE_ROLE, {**PARAMETERS, **change})
    assert isinstance(spec, ThreePlaneSpec)
    return spec


class _Recording:
    """A backend that records its feeds and gives frame k the malignant logit k (benign logit 0)."""

    output_names = ("logits",)

    def __init__(self) -> None:
        self.feeds: list[dict[str, npt.NDArray[np.float32]]] = []

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        self.feeds.append(dict(inputs))
        count = inputs["transverse"].shape[0]
        logits = np.stack([np.zeros(count), np.arange(count, dtype=np.float64)], axis=1)
        return {"logits": logits.astype(np.float32)}


def _crop(shape: tuple[int, int], seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


# --- the scorer ------------------------------------------------------------------------------


def test_every_crop_is_resized_and_zscored_and_the_side_planes_repeat_per_frame() -> None:
    backend = _Recording()
    scorer = ThreePlaneScorer(backend, _spec(), ModelInfo("m", "1", "0" * 64))
    frames = [_crop((40, 57), 1), _crop((12, 9), 2)]
    scorer.score(frames, _crop((33, 20), 3), _crop((20, 61), 4))
    (feed,) = backend.feeds
    assert set(feed) == {"transverse", "sagittal", "coronal"}
    for value in feed.values():
        assert value.shape == (2, 1, SIZE, SIZE) and value.dtype == np.float32
        assert np.allclose(value.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
        assert np.allclose(value.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
    assert not np.allclose(feed["transverse"][0], feed["transverse"][1])  # each frame its own
    assert np.array_equal(feed["sagittal"][0], feed["sagittal"][1])  # one sagittal crop for every frame
    assert np.array_equal(feed["coronal"][0], feed["coronal"][1])


def test_the_lesion_probability_is_the_mean_of_its_frames() -> None:
    scorer = ThreePlaneScorer(_Recording(), _spec(), ModelInfo("m", "1", "0" * 64))
    side, top = _crop((30, 30), 5), _crop((30, 30), 6)
    frames = [_crop((30, 30), seed) for seed in range(3)]
    expected = [_sigmoid(0.0), _sigmoid(1.0), _sigmoid(2.0)]
    assert np.allclose(scorer.frame_probabilities(frames, side, top), expected)
    assert scorer.score(frames, side, top) == pytest.approx(float(np.mean(expected)))
    assert scorer.score(frames[:1], side, top) == pytest.approx(0.5)
    # A single 2-D array is one frame, not a sequence of rows; a 3-D array is (frames, rows, columns).
    assert scorer.score(frames[0], side, top) == pytest.approx(0.5)
    assert scorer.score(np.stack(frames), side, top) == pytest.approx(float(np.mean(expected)))
    assert scorer.is_malignant(0.51) and not scorer.is_malignant(0.5)


@pytest.mark.parametrize(
    ("transverse", "side"),
    [
        ([], _crop((10, 10), 0)),
        ([np.zeros((0, 5), np.uint8)], _crop((10, 10), 0)),
        ([np.zeros((10, 10), np.float32)], _crop((10, 10), 0)),
        ([_crop((10, 10), 0)], np.zeros((10, 10, 3), np.uint8)),
    ],
)
def test_bad_crops_are_refused(transverse: Any, side: Any) -> None:
    scorer = ThreePlaneScorer(_Recording(), _spec(), ModelInfo("m", "1", "0" * 64))
    with pytest.raises(ValueError, match="crop"):
        scorer.score(transverse, side, _crop((10, 10), 1))


def test_softmax_is_stable_for_confident_logits() -> None:
    probabilities = malignancy_of(np.array([[0.0, 800.0], [800.0, 0.0], [1.0, 1.0]], dtype=np.float32))
    assert np.allclose(probabilities, [1.0, 0.0, 0.5])


# --- the manifest ----------------------------------------------------------------------------


def test_the_role_is_a_three_plane_kind_with_typed_fields_and_is_no_bmode_scorer() -> None:
    spec = _spec()
    assert spec.kind is ModelKind.THREE_PLANE and not isinstance(spec, ScorerSpec)
    assert (spec.input_size, spec.roi_expand, spec.frames, spec.frame_step) == (SIZE, 0.1, 3, 2)
    assert spec.inputs == ("transverse", "sagittal", "coronal") and spec.outputs[0] == "logits"
    assert spec.provenance == {"training": {"note": "provenance only"}}
    entry = ModelEntry(ABVS_THREE_PLANE_ROLE, "m", "1", "m.onnx", "0" * 64, dict(PARAMETERS))
    assert default_families_of({}, {ABVS_THREE_PLANE_ROLE: entry}, "US") == ()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"input_size": None}, "input_size"),
        ({"roi_expand": -0.1}, "roi_expand"),
        ({"inputs": ["transverse", "coronal"]}, "inputs"),
        ({"operating_point": 1.5}, "operating_point"),
        ({"frames": 0}, "frames"),
    ],
)
def test_an_incomplete_entry_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError, match=rf"model abvs_three_plane: manifest field parameters\.{field}"):
        parse_spec(ABVS_THREE_PLANE_ROLE, {**PARAMETERS, **change})


def _tiny_graph(path: Path) -> None:
    """Logits (0, mean(plane * ramp) summed over the planes): a graph whose output depends on every input."""
    ramp = np.linspace(-1.0, 1.0, SIZE * SIZE, dtype=np.float32).reshape(1, 1, SIZE, SIZE)
    nodes, inputs = [], []
    for name in ("transverse", "sagittal", "coronal"):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1, SIZE, SIZE]))
        nodes += [
            helper.make_node("Mul", [name, "ramp"], [f"{name}_weighted"]),
            helper.make_node("ReduceMean", [f"{name}_weighted"], [f"{name}_mean"], axes=[2, 3], keepdims=0),
        ]
    nodes += [
        helper.make_node("Sum", ["transverse_mean", "sagittal_mean", "coronal_mean"], ["malignant"]),
        helper.make_node("Mul", ["malignant", "zero"], ["benign"]),
        helper.make_node("Concat", ["benign", "malignant"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_three_plane",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(ramp, "ramp"), numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _folder(tmp_path: Path, with_entry: bool = True) -> Path:
    _tiny_graph(tmp_path / "tiny.onnx")
    entries = {}
    if with_entry:
        parameters = {**PARAMETERS, "outputs": ["logits"]}
        entries[ABVS_THREE_PLANE_ROLE] = ModelEntry(
            ABVS_THREE_PLANE_ROLE, "tiny", "0.0.1", "tiny.onnx", sha256_of(tmp_path / "tiny.onnx"), parameters
        )
    write_manifest(entries, tmp_path)
    return tmp_path


def test_the_loader_verifies_the_file_and_the_scorer_answers_a_probability(tmp_path: Path) -> None:
    scorer = load_three_plane_scorer(_folder(tmp_path))
    assert scorer is not None and scorer.model_info.name == "tiny" and scorer.spec.roi_expand == 0.1
    frames = [_crop((50, 70), seed) for seed in range(3)]
    per_frame = scorer.frame_probabilities(frames, _crop((50, 24), 7), _crop((24, 70), 8))
    assert per_frame.shape == (3,) and len(set(np.round(per_frame, 6))) == 3
    probability = scorer.score(frames, _crop((50, 24), 7), _crop((24, 70), 8))
    assert 0.0 <= probability <= 1.0 and probability == pytest.approx(float(per_frame.mean()))
    graph = tmp_path / "tiny.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + bytes([graph.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(ModelRegistryError, match="sha256"):
        load_three_plane_scorer(tmp_path)


def test_a_manifest_without_the_entry_gives_none(tmp_path: Path) -> None:
    assert load_three_plane_scorer(_folder(tmp_path, with_entry=False)) is None


def test_an_entry_of_another_kind_is_not_served_as_three_plane(tmp_path: Path) -> None:
    from models.inference.three_plane import three_plane_scorer_of

    folder = _folder(tmp_path)
    entry = read_manifest(folder)[ABVS_THREE_PLANE_ROLE]
    other = ModelEntry("dl_u", entry.name, entry.version, entry.file, entry.sha256, {"task": "malignancy"})
    with pytest.raises(ManifestError):
        three_plane_scorer_of(other, folder)


# --- the bundled model and its card ----------------------------------------------------------

BUNDLED = json.loads((BUNDLED_MODEL_DIR / MANIFEST_NAME).read_text())["models"]
needs_bundled = pytest.mark.skipif(ABVS_THREE_PLANE_ROLE not in BUNDLED, reason="no bundled abvs_three_plane")


@needs_bundled
def test_the_bundled_model_loads_scores_and_is_small() -> None:
    scorer = load_three_plane_scorer()
    assert scorer is not None and scorer.spec.kind is ModelKind.THREE_PLANE
    entry = read_manifest()[ABVS_THREE_PLANE_ROLE]
    assert (BUNDLED_MODEL_DIR / entry.file).stat().st_size <= 25 * 2**20
    probability = scorer.score([_crop((40, 60), 1), _crop((42, 58), 2)], _crop((40, 30), 3), _crop((30, 60), 4))
    assert 0.0 <= probability <= 1.0


@needs_bundled
def test_the_committed_card_is_what_its_report_and_entry_give() -> None:
    from models.families.catalogue import card_texts

    entry = read_manifest()[ABVS_THREE_PLANE_ROLE]
    report = json.loads((ROOT / REPORT_PATH).read_text())
    committed = (ROOT / CARD_PATH).read_text()
    assert report["model"]["sha256"] == entry.sha256, "the report scored another file: rerun --stage evaluate"
    assert committed == three_plane_card(entry, report, card_texts()[ABVS_THREE_PLANE_ROLE])
    assert entry.sha256 in committed and "not a diagnosis" in committed
    assert "Not validated on ABVS data" in committed and "retraction phenomenon" in committed


# --- the crops a caller passes (train extra) -------------------------------------------------


def test_plane_crops_cut_the_real_lesion_at_the_centre_and_each_plane_through_it() -> None:
    pytest.importorskip("torch", reason="the synthetic volumes need the train extra (make train-venv)")
    import cv2

    from models.training.abvs_volumes import build_volume, central_lesion_centre, plane_crops

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(120, 20, (80, 100)), 0, 255).astype(np.uint8)
    mask = np.zeros((80, 100), np.uint8)
    cv2.ellipse(mask, (50, 40), (20, 12), 0, 0, 360, 1, -1)
    image[mask > 0] = 40
    volume, lesion = build_volume(image, mask, depth=24, rng=1)
    centre = central_lesion_centre(lesion)
    transverse = plane_crops(volume, lesion, centre, 0, [0, -2, 2], 0.0)
    assert len(transverse) == 3
    assert np.array_equal(transverse[0], image[28:53, 30:71])  # the real image, the lesion's own box
    sagittal = plane_crops(volume, lesion, centre, 1, [0], 0.1)[0]
    coronal = plane_crops(volume, lesion, centre, 2, [0], 0.1)[0]
    assert (
        sagittal.shape[0] > 20 and coronal.shape[1] > 36
    )  # depth rows of the sagittal, lateral columns of the coronal
    assert sagittal.dtype == coronal.dtype == np.uint8
