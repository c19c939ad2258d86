"""The pure parts of the bench's precision part (bench/precision.py): the variants, the latency rounds, the choice.

Graphs are built here small (a convolution, a ReLU, a pooled linear head) or
read from the bundled models; nothing is timed against a wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

from onnx import TensorProto, helper, numpy_helper

from bench import precision, report
from bench.run import tables
from models.inference.backend import OnnxRuntimeBackend
from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest

Arrays = dict[str, npt.NDArray[np.float32]]


def _small_graph(channels: int = 8) -> Any:
    """image (1, 1, 16, 16) -> Conv 3x3 -> ReLU -> global average pool -> Flatten -> Gemm -> logits (1, 2), float32."""
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.3, (channels, 1, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, channels).astype(np.float32)
    head = rng.normal(0, 0.5, (2, channels)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(head, "head"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _backend(model: Any, folder: Path, name: str) -> OnnxRuntimeBackend:
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return OnnxRuntimeBackend(path)


def _io(model: Any) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    graph = model.graph
    return (
        [(v.name, v.type.tensor_type.elem_type) for v in graph.input],
        [(v.name, v.type.tensor_type.elem_type) for v in graph.output],
    )


def _image(seed: int = 0, shape: tuple[int, ...] = (1, 1, 16, 16)) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


# ----------------------------------------------------------------------------------------- the variants


def test_fp16_then_fp32_keeps_names_computes_in_float32_and_stays_close(tmp_path: Path) -> None:
    fp32 = _small_graph()
    fp16 = precision.to_float16(fp32)
    assert precision.is_float16(fp16) and not precision.is_float16(fp32)
    assert [name for name, _ in _io(fp16)[0]] == ["image"] and [name for name, _ in _io(fp16)[1]] == ["logits"]
    back = precision.to_float32(fp16)
    assert _io(back) == ([("image", TensorProto.FLOAT)], [("logits", TensorProto.FLOAT)])
    assert {i.data_type for i in back.graph.initializer} == {TensorProto.FLOAT}
    feed = {"image": _image()}
    reference = _backend(fp32, tmp_path, "reference").run(feed)["logits"]
    half = _backend(fp16, tmp_path, "half").run(feed)["logits"]
    upcast = _backend(back, tmp_path, "upcast").run(feed)["logits"]
    assert np.abs(half - reference).max() < 0.02
    # The fp32 variant holds the fp16 weights exactly: it may differ from the fp16 graph by fp16 rounding only,
    # and from the original float32 graph by the weights' rounding.
    assert np.abs(upcast - half).max() < 0.02
    assert np.abs(upcast - reference).max() < 0.02


def test_a_float16_graph_is_its_own_fp16_variant() -> None:
    fp16 = precision.to_float16(_small_graph())
    assert precision.to_float16(fp16) is fp16


def test_fp32_folds_int8_weight_storage_into_float32_initializers(tmp_path: Path) -> None:
    pytest.importorskip("torch")  # models.families.onnx_export is the training side's module
    from models.families.onnx_export import int8_convolution_weights

    fp16 = precision.to_float16(_small_graph())
    stored, count = int8_convolution_weights(fp16, min_elements=1)
    assert count == 1 and TensorProto.INT8 in {i.data_type for i in stored.graph.initializer}
    upcast = precision.to_float32(stored)
    graph = upcast.graph
    assert {i.data_type for i in graph.initializer} == {TensorProto.FLOAT}
    assert [n.op_type for n in graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    conv = graph.node[0]
    assert conv.input[1] in {i.name for i in graph.initializer}  # an initializer again, as quantisation needs
    feed = {"image": _image(3)}
    served = _backend(stored, tmp_path, "stored").run(feed)["logits"]
    assert np.abs(_backend(upcast, tmp_path, "upcast").run(feed)["logits"] - served).max() < 0.02


def test_fp32_refuses_a_graph_with_subgraphs() -> None:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    node = helper.make_node("If", ["condition"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node],
        "with_if",
        [
            helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(precision.PrecisionError, match="subgraph"):
        precision.to_float32(helper.make_model(graph))


def test_int8_static_keeps_names_quantises_the_convolution_and_stays_close(tmp_path: Path) -> None:
    fp32 = _small_graph(channels=16)
    calibration = [{"image": _image(seed)} for seed in range(20)]
    int8 = precision.to_int8(fp32, calibration, tmp_path)
    assert _io(int8) == _io(fp32)
    operators = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators
    feed = {"image": _image(99)}
    reference = _backend(fp32, tmp_path, "reference").run(feed)["logits"]
    quantised = _backend(int8, tmp_path, "quantised").run(feed)["logits"]
    assert not np.array_equal(quantised, reference)  # it did change the arithmetic ...
    assert np.abs(quantised - reference).max() < 0.05 * max(1.0, float(np.abs(reference).max()))  # ... a little


def test_int8_static_needs_calibration_inputs(tmp_path: Path) -> None:
    with pytest.raises(precision.PrecisionError, match="calibration"):
        precision.to_int8(_small_graph(), [], tmp_path)


def test_the_variants_of_a_bundled_graph_keep_its_inputs_and_outputs(tmp_path: Path) -> None:
    entry = read_manifest()["dl_u"]
    bundled = onnx.load(str(BUNDLED_MODEL_DIR / entry.file))
    size = int(entry.parameters["input_size"])
    calibration = [{"image": _image(seed, (1, 1, size, size))} for seed in range(8)]
    variants = precision.variant_models(bundled, calibration, tmp_path)
    assert list(variants) == list(precision.VARIANTS)
    assert variants["fp16"] is bundled  # served as float16 already
    names = [[name for name, _ in side] for side in _io(bundled)]
    feed = {"image": _image(5, (1, 1, size, size))}
    served = _backend(bundled, tmp_path, "served").run(feed)
    for variant, model in variants.items():
        assert [[name for name, _ in side] for side in _io(model)] == names, variant
        outputs = _backend(model, tmp_path, variant).run(feed)
        assert set(outputs) == set(served)
        if variant == "fp32":  # the same weights in float32: fp16 rounding apart (the manifest's own check: 0.0054)
            assert np.abs(outputs["logit"] - served["logit"]).max() < 0.05


# ----------------------------------------------------------------------------------------- latency and the choice


class _Recording:
    """A real backend that also records, in one shared list, which backend ran which feed."""

    def __init__(self, name: str, backend: OnnxRuntimeBackend, log: list[tuple[str, int]]) -> None:
        self.name, self.backend, self.log = name, backend, log

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.backend.output_names

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        self.log.append((self.name, int(inputs["marker"][0])))
        return self.backend.run({"image": inputs["image"]})


def test_latency_rounds_rotate_the_order_cycle_the_inputs_and_warm_up_untimed(tmp_path: Path) -> None:
    backend = _backend(_small_graph(), tmp_path, "small")
    log: list[tuple[str, int]] = []
    backends = {name: _Recording(name, backend, log) for name in ("a", "b", "c")}
    feeds = [{"image": _image(k), "marker": np.array([k], np.float32)} for k in range(2)]
    ticks = iter(range(1000))
    times = precision.interleaved_latency(backends, feeds, rounds=4, clock=lambda: float(next(ticks)))
    assert log[:3] == [("a", 0), ("b", 0), ("c", 0)]  # warm-up
    assert log[3:] == [
        ("a", 0), ("b", 0), ("c", 0),
        ("b", 1), ("c", 1), ("a", 1),
        ("c", 0), ("a", 0), ("b", 0),
        ("a", 1), ("b", 1), ("c", 1),
    ]  # fmt: skip
    assert {name: len(values) for name, values in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(value == 1.0 for values in times.values() for value in values)  # one tick per timed call
    with pytest.raises(precision.PrecisionError):
        precision.interleaved_latency(backends, [], rounds=1)


def test_latency_figures_are_medians_in_ms_with_the_ratio_to_fp32() -> None:
    figures = precision.latency_figures({"fp32": [0.010, 0.030, 0.020], "int8": [0.005, 0.004, 0.006, 0.5]})
    assert figures["fp32"]["median_ms"] == 20.0 and figures["fp32"]["ratio_to_fp32"] == 1.0
    assert figures["int8"]["median_ms"] == 5.5 and figures["int8"]["ratio_to_fp32"] == 0.275
    assert figures["int8"]["runs"] == 4
    assert precision.latency_figures({"fp16": [0.01]})["fp16"]["ratio_to_fp32"] is None


def test_a_variant_holds_when_its_figure_lies_in_the_served_interval() -> None:
    quality = precision.quality_figures(
        {"fp32": 0.90, "fp16": 0.91, "int8": 0.84},
        {"fp32": (0.80, 0.97), "fp16": (0.85, 0.96), "int8": (0.70, 0.93)},
        served="fp16",
    )
    assert [quality[v]["holds"] for v in ("fp32", "fp16", "int8")] == [True, True, False]
    assert quality["int8"]["ci"] == [0.70, 0.93]
    assert precision.holds(0.85, (0.85, 0.96)) and precision.holds(0.96, (0.85, 0.96))


def test_the_fastest_variant_that_holds_is_chosen() -> None:
    variants = {
        "fp32": {"median_ms": 40.0, "holds": True},
        "fp16": {"median_ms": 45.0, "holds": True},
        "int8": {"median_ms": 15.0, "holds": False},
    }
    assert precision.fastest_holding(variants) == "fp32"
    variants["int8"]["holds"] = True
    assert precision.fastest_holding(variants) == "int8"
    assert precision.fastest_holding({k: {**v, "holds": False} for k, v in variants.items()}) is None


class _Seeing:
    """A real backend that keeps every feed it is given."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.seen = backend, []

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.backend.output_names)

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        self.seen.append(inputs)
        return dict(self.backend.run(inputs))


def test_family_feed_is_what_the_served_scorer_gives_its_graph() -> None:
    from models.inference.family_scorer import FamilyScorer, load_family_scorer
    from models.inference.scorers import ClinicalContext

    entries = read_manifest()
    gray = (np.random.default_rng(2).random((300, 400)) * 255).astype(np.uint8)
    box = (120, 80, 90, 60)
    for role, age in (("dl_u", None), ("dlr_bm", 57.0)):
        served = load_family_scorer(entries[role], BUNDLED_MODEL_DIR)
        seeing = _Seeing(served._backend)
        FamilyScorer(entries[role], seeing, BUNDLED_MODEL_DIR).score(gray, box, ClinicalContext(age_years=age))
        feed = precision.family_feed(served, gray, box, age)
        assert set(feed) == set(seeing.seen[0]), role
        for name, value in feed.items():
            np.testing.assert_array_equal(value, seeing.seen[0][name])


# ----------------------------------------------------------------------------------------- the tables


def _result() -> dict[str, Any]:
    def variant(ms: float, value: float, ci: tuple[float, float], held: bool, same: bool | None) -> dict[str, Any]:
        figures: dict[str, Any] = {"median_ms": ms, "ratio_to_fp32": round(ms / 40.0, 3), "value": value}
        figures |= {"ci": list(ci), "holds": held}
        return figures | ({} if same is None else {"serves_the_same": same})

    return {
        "variants": {"int8": "ONNX Runtime static quantisation, QDQ"},
        "latency": {"rounds": 30},
        "interval": "95 % percentile bootstrap over patients, 1000 resamples",
        "models": {
            "dlr_bm": {
                "served": "fp16",
                "metric": "AUC",
                "variants": {
                    "fp32": variant(40.0, 0.919, (0.87, 0.96), True, True),
                    "fp16": variant(44.0, 0.918, (0.87, 0.96), True, True),
                    "int8": variant(16.0, 0.90, (0.85, 0.95), True, False),
                },
                "fastest_holding": "int8",
            },
            "us_segmenter": {
                "served": "fp16",
                "metric": "Dice",
                "variants": {
                    "fp32": variant(40.0, 0.80, (0.77, 0.83), True, None),
                    "fp16": variant(48.0, 0.80, (0.77, 0.83), True, None),
                    "int8": variant(20.0, 0.60, (0.55, 0.65), False, None),
                },
                "fastest_holding": "fp32",
            },
        },
    }


def test_precision_tables_mark_the_served_variant_and_the_fastest_that_holds() -> None:
    result = _result()
    table = report.precision_table(result)
    assert "| dlr_bm       | fp16 (served) |" in table
    assert "0.900 [0.850, 0.950]" in table
    lines = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert lines["dlr_bm/int8"].rstrip(" |").endswith("no")  # in the CI, but not the export's stricter rule
    assert "| -" in lines["us_segmenter/int8"]  # no export rule for the segmentation
    summary = report.precision_summary_table(result)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in summary.splitlines()[2:]}
    assert rows["dlr_bm"] == ["fp16", "44.0", "int8", "16.0", "2.75"]
    assert rows["us_segmenter"] == ["fp16", "48.0", "fp32", "40.0", "1.20"]
    result["models"]["dlr_bm"]["fastest_holding"] = None
    assert "| none " in report.precision_summary_table(result)
    for figures in result["models"]["us_segmenter"]["variants"].values():  # --no-dice: timed, not judged
        figures |= {"value": None, "ci": None, "holds": None}
    result["models"]["us_segmenter"]["fastest_holding"] = None
    assert "not measured" in report.precision_table(result)
    assert "| not judged " in report.precision_summary_table(result)


def test_the_printed_tables_include_precision_when_it_ran() -> None:
    payload = {
        "machine": {"host": "vm", "cpu_model": "x", "logical_cpus": 2},
        "load": {"summary": "idle"},
        "precision": _result(),
    }
    text = tables(payload)
    assert "Precision (each served US graph as fp32, fp16 and int8" in text
    assert "fastest that holds" in text
