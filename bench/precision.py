"""Precision: each served ultrasound graph's inference floor in fp32, fp16 and int8, and what each variant serves.

For every family graph of the manifest's default US pipeline (the consensus
brings its members) and the segmenter and refiner, three *compute variants*
are made in memory from the bundled graph:

fp32
    Everything float32: float16 initializers, constants, casts and the
    graph's inputs and outputs upcast (:func:`to_float32`); weights stored
    as int8 (``weight_storage`` in the manifest, rebuilt by ``Cast`` and
    ``Mul`` at session start) are folded into float32 initializers, as ONNX
    Runtime folds them when a session starts. The same numbers as served,
    computed in float32.
fp16
    float16 compute: the bundled graph as it is where it is float16 (every
    graph served here is), else converted by ``onnxconverter-common`` as
    ``models.training.export_reference`` converts (:func:`to_float16`).
int8
    ONNX Runtime's *static* QDQ quantisation of the fp32 variant
    (:func:`to_int8`), calibrated on lesion ROIs of the TRAINING split
    (never the validation lesions it is judged on). ONNX Runtime's dynamic
    quantisation does cover ``Conv``, as ``ConvInteger``, but ran 2.2-5.2 times
    slower than fp32 on these graphs here (bench/README.md, "Precision on
    this CPU"); ``--int8 dynamic`` measures it again.

Each variant is run by :class:`models.inference.backend.OnnxRuntimeBackend`,
the worker's own backend with the worker's session settings (ONNX Runtime's
default thread count, ``ORT_ENABLE_ALL``), from a file in a temporary folder.

Latency
    Per graph, the variants run back to back, ``rounds`` times each on real
    validation inputs, their order rotated every round so that none always
    runs first or last; the figure is the median per call, and its ratio to
    fp32.
What each variant serves
    Each family's validation lesions (the project's split,
    :func:`models.datasets.load_records` and
    :func:`models.training.samples.lesion_samples`, as the export builds its
    validation set; the test split stays held out) are scored through
    :class:`models.inference.family_scorer.FamilyScorer` with the variant's
    backend (the ROI, the clinical inputs, CLDLR's SVM as served). Figure:
    AUC with a 95 % percentile-bootstrap interval over patients
    (:func:`models.evaluation.stats.bootstrap_ci`). A variant *holds* when
    its AUC lies inside the served graph's interval. The export's stricter
    rule for a smaller graph (:func:`models.training.export_family.serves_the_same`:
    no probability moves by 0.05 or more, AUC drops by less than 0.005) is shown beside
    it.
    For the segmenter and refiner, a pair of one precision outlines every
    validation lesion image as served
    (:func:`models.inference.pipeline.segment_lesions`); figure: mean Dice
    against the ground-truth mask, its interval by
    :func:`models.evaluation.stats.mean_ci` over patients.

The fastest variant that holds is reported per graph (:func:`fastest_holding`).
Nothing here changes which graphs the service ships.

    python -m bench --only precision            # with the machine line, the table and a results file
    python -m bench.precision --roles dl_u      # this part alone, JSON on stdout
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from models.inference.backend import Backend

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = ROOT.parent / "shared" / "datasets"
VARIANTS = ("fp32", "fp16", "int8")
#: The variant a bundled graph is, by its manifest ``precision``.
SERVED_VARIANT = {"float32": "fp32", "float16": "fp16"}
#: Validation inputs the latency rounds cycle through (real ROIs, so no variant is timed on one lucky input).
LATENCY_INPUTS = 8
SEGMENTATION = "segmentation"
FAMILY = "family"

Arrays = Mapping[str, npt.NDArray[np.float32]]


class PrecisionError(RuntimeError):
    """A graph cannot be converted (an unsupported construct) or there is nothing to judge it on."""


@dataclass(frozen=True)
class Int8Settings:
    """How :func:`to_int8` quantises (``onnxruntime.quantization.quantize_static``, QDQ format).

    The defaults are ONNX Runtime's advice for an x86-64 CPU without VNNI
    (this machine has AVX2 only; see ``quantize_static``'s docstring,
    "Choosing parameters for CPU inference"): unsigned 8-bit activations,
    signed 8-bit weights, ``reduce_range`` (7-bit weights, so that AVX2's
    ``VPMADDUBSW`` is less likely to saturate), one scale per tensor (ONNX
    Runtime's fastest on CPU; per-channel scales also stopped with an
    ``IndexError`` on dlr_bm's ``Gemm`` bias in ONNX Runtime 1.32). MinMax
    calibration.
    """

    method: str = "static"  # "static" (QDQ, calibrated) or "dynamic" (ConvInteger / MatMulInteger, no calibration)
    per_channel: bool = False
    reduce_range: bool = True
    op_types: tuple[str, ...] = ()  # operator types to quantise; () = every type the tool quantises


@dataclass(frozen=True)
class PrecisionOptions:
    """What :func:`run_precision` measures."""

    datasets: Path = DEFAULT_DATASETS
    rounds: int = 30  # timed latency rounds per graph, every variant once per round
    calibration: int = 200  # training-split ROIs (or images, for the segmenter) that calibrate int8
    resamples: int = 1000  # bootstrap resamples of each interval
    roles: tuple[str, ...] = ()  # () = the default US families, the segmenter and the refiner
    dice: bool = True  # the segmenter and refiner's validation Dice per variant (about 40 % of the run's time)
    int8: Int8Settings = Int8Settings()
    model_dir: Path | None = None  # None: the bundled models/weights


# ----------------------------------------------------------------------------------------- the variants


def _check_no_subgraphs(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise PrecisionError(f"node {node.name or node.op_type} holds a subgraph, which is not converted")


def _fold_constant_casts_and_products(graph: onnx.GraphProto) -> None:
    """Replace ``Cast`` and ``Mul`` nodes whose inputs are all initializers by their result, as an initializer.

    These are the int8 weight rebuilds of
    :func:`models.families.onnx_export.int8_convolution_weights`; folded, a
    convolution's weight is an initializer again, which quantisation needs.
    """
    constants = {initializer.name: numpy_helper.to_array(initializer) for initializer in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type not in ("Cast", "Mul") or not all(name in constants for name in node.input):
            kept.append(node)
            continue
        values = [constants[name] for name in node.input]
        if node.op_type == "Cast":
            target = next(a.i for a in node.attribute if a.name == "to")
            constants[node.output[0]] = values[0].astype(onnx.helper.tensor_dtype_to_np_dtype(target))
        else:
            constants[node.output[0]] = np.multiply(values[0], values[1])
    used = {name for node in kept for name in node.input} | {output.name for output in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items() if name in used)


def _float32_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float32 throughout: the fp32 variant.

    float16 initializers and constant tensors (``Constant``,
    ``ConstantOfShape``) become float32 with the same values, ``Cast`` to
    float16 becomes ``Cast`` to float32, and every float16 input, output and
    intermediate type is float32; constant ``Cast``/``Mul`` chains (int8
    weight storage) are folded (see :func:`_fold_constant_casts_and_products`).

    Raises
    ------
    PrecisionError
        The graph holds subgraphs (``If``, ``Loop``), which this does not walk.
    """
    _check_no_subgraphs(model)
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT16:
                attribute.i = onnx.TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == onnx.TensorProto.FLOAT16:
                attribute.t.CopyFrom(_float32_tensor(attribute.t))
    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == onnx.TensorProto.FLOAT16:
            graph.initializer[index].CopyFrom(_float32_tensor(initializer))
    _fold_constant_casts_and_products(graph)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.checker.check_model(converted)
    return converted


def is_float16(model: onnx.ModelProto) -> bool:
    """Whether the graph takes float16 inputs (what the export writes when it keeps a graph in fp16)."""
    types = [value.type.tensor_type.elem_type for value in model.graph.input]
    return bool(types) and all(t != onnx.TensorProto.FLOAT for t in types) and onnx.TensorProto.FLOAT16 in types


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 variant: ``model`` itself where it already computes in float16, else converted as the export does.

    ``onnxconverter_common.float16.convert_float_to_float16`` with float16
    inputs and outputs (``keep_io_types=False``), as
    ``models.training.export_reference`` and ``export_family`` convert.
    """
    if is_float16(model):
        return model
    from onnxconverter_common import float16

    converted: onnx.ModelProto = float16.convert_float_to_float16(model, keep_io_types=False)
    return converted


def to_int8(
    model_fp32: onnx.ModelProto,
    calibration: Sequence[Arrays],
    folder: Path,
    settings: Int8Settings = Int8Settings(),
) -> onnx.ModelProto:
    """The int8 variant of an fp32 graph by ONNX Runtime's quantisation tool.

    ``onnxruntime.quantization.quant_pre_process`` first (shape inference
    and ONNX Runtime's basic graph optimisations, as its documentation asks
    before quantising), then ``quantize_static`` in QDQ format calibrated on
    ``calibration`` (float32 feeds), or ``quantize_dynamic`` with
    ``settings.method == "dynamic"`` (``calibration`` unused). Files go
    through ``folder``, as the tool reads and writes paths.

    Raises
    ------
    PrecisionError
        Static quantisation without calibration feeds, or an unknown method.
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    source, prepared, target = folder / "fp32-source.onnx", folder / "fp32-prepared.onnx", folder / "int8.onnx"
    onnx.save(model_fp32, str(source))
    # Symbolic shape inference is skipped: every graph here has static shapes, which ONNX's own inference covers.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    if settings.method == "dynamic":
        quantize_dynamic(
            str(prepared),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            op_types_to_quantize=list(settings.op_types) or None,
        )
    elif settings.method == "static":
        if not calibration:
            raise PrecisionError("static int8 quantisation needs calibration inputs")
        quantize_static(
            str(prepared),
            str(target),
            _calibration_reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            op_types_to_quantize=list(settings.op_types) or None,
        )
    else:
        raise PrecisionError(f"unknown int8 method {settings.method!r} (static or dynamic)")
    return onnx.load(str(target))


def _calibration_reader(feeds: Sequence[Arrays]) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` handing out ``feeds`` once each, then None."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            feed = next(self._feeds, None)
            return None if feed is None else {name: np.asarray(v, dtype=np.float32) for name, v in feed.items()}

    return Feeds()


def variant_models(
    bundled: onnx.ModelProto, calibration: Sequence[Arrays], folder: Path, settings: Int8Settings = Int8Settings()
) -> dict[str, onnx.ModelProto]:
    """The three compute variants of one bundled graph, in :data:`VARIANTS` order."""
    fp32 = to_float32(bundled)
    return {"fp32": fp32, "fp16": to_float16(bundled), "int8": to_int8(fp32, calibration, folder, settings)}


# ----------------------------------------------------------------------------------------- pure figures


def interleaved_latency(
    backends: Mapping[str, Backend],
    feeds: Sequence[Arrays],
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each backend, all measured in the same rounds.

    Every backend runs once untimed on the first feed (session warm-up),
    then ``rounds`` rounds: round ``r`` runs every backend once on feed
    ``r mod len(feeds)``, starting with the ``r``-th backend (order rotated,
    so that none always follows the same one).
    """
    if not feeds or rounds < 1:
        raise PrecisionError("latency needs at least one input and one round")
    names = list(backends)
    for name in names:
        backends[name].run(feeds[0])
    times: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        feed = feeds[number % len(feeds)]
        for name in names[shift:] + names[:shift]:
            started = clock()
            backends[name].run(feed)
            times[name].append(clock() - started)
    return times


def latency_figures(times: Mapping[str, Sequence[float]], baseline: str = "fp32") -> dict[str, dict[str, Any]]:
    """Median ms per call of each variant, its spread (10th-90th percentile) and its ratio to ``baseline``."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians.get(baseline)
    figures = {}
    for name, values in times.items():
        low, high = np.quantile(np.asarray(values, dtype=float), [0.1, 0.9])
        figures[name] = {
            "median_ms": round(1000.0 * medians[name], 2),
            "p10_p90_ms": [round(1000.0 * float(low), 2), round(1000.0 * float(high), 2)],
            "runs": len(values),
            "ratio_to_fp32": round(medians[name] / reference, 3) if reference else None,
        }
    return figures


def holds(value: float, interval: Sequence[float]) -> bool:
    """Whether ``value`` lies inside ``interval`` (bounds included)."""
    return float(interval[0]) <= value <= float(interval[1])


def fastest_holding(variants: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The variant with the lowest median latency among those that hold the served figure's interval.

    ``variants``: name -> ``{"median_ms": ..., "holds": ...}``; None when none holds (or none was timed).
    """
    candidates = [
        (float(figures["median_ms"]), name)
        for name, figures in variants.items()
        if figures.get("holds") and figures.get("median_ms") is not None
    ]
    return min(candidates)[1] if candidates else None


def quality_figures(
    values: Mapping[str, float], intervals: Mapping[str, Sequence[float]], served: str
) -> dict[str, dict[str, Any]]:
    """Each variant's figure and interval, and whether it lies inside the served variant's interval."""
    reference = intervals[served]
    return {
        name: {
            "value": float(values[name]),
            "ci": [float(v) for v in intervals[name]],
            "holds": holds(values[name], reference),
        }
        for name in values
    }


# ----------------------------------------------------------------------------------------- the data


@functools.cache
def _records(root: Path, datasets: tuple[str, ...]) -> tuple[Any, ...]:
    from models.datasets import load_records

    return tuple(load_records(root, datasets))


@functools.cache
def _lesions(
    root: Path, datasets: tuple[str, ...], task: str, split: str, limit: int | None, holdout: str
) -> list[Any]:
    """Lesion samples of one split, as ``models.training.samples.split_samples`` builds them (``holdout`` left out).

    ``limit``: a seeded random choice of that many records first (the int8 calibration set), so that only those
    images are read.
    """
    from models.datasets import birads_high
    from models.training.samples import lesion_samples

    records = [r for r in _records(root, datasets) if r.split == split and r.dataset != holdout]
    if limit is not None:
        # Only records lesion_samples can use (a mask, a label for the task, by its own rule), so that about
        # ``limit`` lesions come out.
        usable = [
            r
            for r in records
            if r.mask_path is not None and (r.malignant if task == "malignancy" else birads_high(r.birads)) is not None
        ]
        chosen = np.random.default_rng(0).permutation(len(usable))[:limit]
        records = [usable[i] for i in sorted(chosen)]
    return list(lesion_samples(records, task))


def _context(record: Any) -> Any:
    from models.inference.scorers import ClinicalContext

    return ClinicalContext(age_years=record.age_years, pixel_spacing_mm=record.pixel_spacing_mm)


def family_feed(scorer: Any, gray: npt.NDArray[np.uint8], box: Any, age_years: float | None) -> dict[str, Any]:
    """The feed :meth:`models.inference.family_scorer.FamilyScorer.score` gives its graph for one lesion."""
    from models.inference.family_scorer import age_inputs

    feed = {"image": scorer.roi_input(gray, box)[1]}
    if "clinical" in scorer.spec.inputs:
        feed["clinical"] = np.array([age_inputs(age_years)], dtype=np.float32)
    return feed


# ----------------------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def _variant_backends(
    bundled: Path, calibration: Sequence[Arrays], settings: Int8Settings
) -> Iterator[dict[str, Backend]]:
    """Each variant of the graph at ``bundled`` behind the worker's backend, from files in a temporary folder."""
    from models.inference.backend import OnnxRuntimeBackend

    with tempfile.TemporaryDirectory(prefix="breastai-bench-precision-") as name:
        folder = Path(name)
        models = variant_models(onnx.load(str(bundled)), calibration, folder, settings)
        backends: dict[str, Backend] = {}
        for variant, model in models.items():
            path = folder / f"{variant}.onnx"
            onnx.save(model, str(path))
            backends[variant] = OnnxRuntimeBackend(path)
        yield backends


def measure_family(
    entry: Any, model_dir: Path, options: PrecisionOptions, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Latency and validation AUC of each variant of one family graph."""
    from models.evaluation.stats import auc, bootstrap_ci
    from models.families.catalogue import family_specs
    from models.inference.family_scorer import FamilyScorer
    from models.inference.registry import verified_path
    from models.training.export_family import largest_probability_shift, serves_the_same

    parameters = entry.parameters
    spec = family_specs()[parameters.get("family", entry.role)]
    holdout = parameters.get("trained_without") or ""
    served = SERVED_VARIANT[parameters["precision"]]
    validation = _lesions(options.datasets, tuple(spec.datasets), spec.task, "val", None, holdout)
    training = _lesions(options.datasets, tuple(spec.datasets), spec.task, "train", options.calibration, holdout)
    if not validation:
        raise PrecisionError(f"{entry.role}: no validation lesions under {options.datasets}")
    started = time.perf_counter()
    # The calibration feeds are cut by the served scorer's own ROI rule (any variant's scorer cuts the same ROI).
    probe = FamilyScorer(entry, _NoBackend(), model_dir)
    calibration = [family_feed(probe, s.image, s.box, s.record.age_years) for s in training]
    with _variant_backends(verified_path(entry, model_dir), calibration, options.int8) as backends:
        prepared = time.perf_counter() - started
        scorers = {variant: FamilyScorer(entry, backend, model_dir) for variant, backend in backends.items()}
        labels = [s.label for s in validation]
        patients = [s.record.patient for s in validation]
        probabilities: dict[str, list[float]] = {variant: [] for variant in scorers}
        for sample in validation:
            context = _context(sample.record)
            for variant, scorer in scorers.items():
                probabilities[variant].append(scorer.score(sample.image, sample.box, context).probability)
        feeds = [family_feed(probe, s.image, s.box, s.record.age_years) for s in validation[:LATENCY_INPUTS]]
        latency = latency_figures(interleaved_latency(backends, feeds, options.rounds))
    aucs = {variant: auc(labels, values) for variant, values in probabilities.items()}
    intervals = {
        variant: bootstrap_ci(labels, values, resamples=options.resamples, clusters=patients)
        for variant, values in probabilities.items()
    }
    quality = quality_figures(aucs, intervals, served)
    variants = {}
    for variant in probabilities:
        variants[variant] = {
            **latency[variant],
            **quality[variant],
            "max_probability_shift": largest_probability_shift(probabilities[served], probabilities[variant]),
            "serves_the_same": serves_the_same(labels, probabilities[served], probabilities[variant]),
        }
    result = {
        "kind": FAMILY,
        "metric": "AUC",
        "task": spec.task,
        "served": served,
        "weight_storage_int8": bool((parameters.get("weight_storage") or {}).get("accepted")),
        "manifest_val_auc_as_served": parameters.get("training", {}).get("val_auc_as_served"),
        "validation": {"lesions": len(validation), "positives": int(sum(labels)), "patients": len(set(patients))},
        "calibration_rois": len(calibration),
        "prepare_s": round(prepared, 1),
        "variants": variants,
        "fastest_holding": fastest_holding(variants),
        "seconds": round(time.perf_counter() - started, 1),
    }
    progress(
        f"precision: {entry.role}: "
        + ", ".join(f"{v} {f['median_ms']:.1f} ms AUC {f['value']:.3f}" for v, f in variants.items())
        + f" ({result['seconds']:.0f} s)"
    )
    return result


class _NoBackend:
    """Stands where a scorer's graph would be when the scorer only cuts ROIs (:func:`family_feed` never runs it)."""

    output_names: tuple[str, ...] = ()

    def run(self, inputs: Arrays) -> dict[str, npt.NDArray[np.float32]]:
        raise PrecisionError("this scorer only cuts ROIs")


def measure_segmentation(
    entries: Mapping[str, Any], model_dir: Path, options: PrecisionOptions, progress: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Latency of each variant of the segmenter and of the refiner, and the mean Dice of each same-precision pair.

    The pair outlines every validation lesion image of the US datasets as
    served (:func:`models.inference.pipeline.segment_lesions`); the union of
    the outlines found is compared with the whole ground-truth mask (an image
    where nothing was found scores 0). The segmenter is timed on whole
    images, the refiner on the window it sees around each ground-truth lesion
    (:func:`models.inference.refine.refiner_window`); int8 is calibrated on
    the same inputs from training-split images.
    """
    from models.datasets import US_DATASETS, read_mask
    from models.evaluation.stats import dice, mean_ci
    from models.inference.manifest import RefinerSpec, SegmenterSpec
    from models.inference.pipeline import REFINER_ROLE, SEGMENTER_ROLE, segment_lesions
    from models.inference.preprocess import crop, standardise
    from models.inference.refine import refiner_window
    from models.inference.registry import verified_path

    started = time.perf_counter()
    segmenter_entry, refiner_entry = entries[SEGMENTER_ROLE], entries.get(REFINER_ROLE)
    segmenter_size = segmenter_entry.spec_as(SegmenterSpec).input_size
    validation = _lesions(options.datasets, tuple(US_DATASETS), "malignancy", "val", None, "")
    training = _lesions(options.datasets, tuple(US_DATASETS), "malignancy", "train", options.calibration, "")
    if not validation:
        raise PrecisionError(f"no validation lesion images under {options.datasets}")

    def windows(samples: Sequence[Any], spec: RefinerSpec) -> list[Arrays]:
        cut = [
            crop(s.image, refiner_window(s.box, (int(s.image.shape[0]), int(s.image.shape[1])), spec.window_expand))
            for s in samples
        ]
        return [{"image": standardise(window, spec.input_size)} for window in cut]

    graphs = {SEGMENTER_ROLE: segmenter_entry} | ({REFINER_ROLE: refiner_entry} if refiner_entry else {})
    calibration: dict[str, list[Arrays]] = {
        SEGMENTER_ROLE: [{"image": standardise(s.image, segmenter_size)} for s in training]
    }
    inputs: dict[str, list[Arrays]] = {
        SEGMENTER_ROLE: [{"image": standardise(s.image, segmenter_size)} for s in validation[:LATENCY_INPUTS]]
    }
    if refiner_entry is not None:
        refining = refiner_entry.spec_as(RefinerSpec)
        calibration[REFINER_ROLE] = windows(training, refining)
        inputs[REFINER_ROLE] = windows(validation[:LATENCY_INPUTS], refining)
    patients = [s.record.patient for s in validation]
    with contextlib.ExitStack() as stack:
        backends = {
            role: stack.enter_context(
                _variant_backends(verified_path(entry, model_dir), calibration[role], options.int8)
            )
            for role, entry in graphs.items()
        }
        dices: dict[str, list[float]] = {variant: [] for variant in backends[SEGMENTER_ROLE]}
        for sample in validation if options.dice else ():
            truth = read_mask(sample.record, sample.image.shape).astype(bool)
            for variant in dices:
                refiner = (backends[REFINER_ROLE][variant], refiner_entry) if refiner_entry is not None else None
                found = np.zeros(truth.shape, dtype=bool)
                for component in segment_lesions(
                    backends[SEGMENTER_ROLE][variant], segmenter_entry, refiner, sample.image
                ):
                    found |= component.mask
                dices[variant].append(dice(found, truth))
        latency = {
            role: latency_figures(interleaved_latency(backends[role], inputs[role], options.rounds)) for role in graphs
        }
    served = SERVED_VARIANT[segmenter_entry.parameters["precision"]]
    quality: dict[str, dict[str, Any]] = {variant: {"value": None, "ci": None, "holds": None} for variant in dices}
    if options.dice:
        means = {variant: float(np.mean(values)) for variant, values in dices.items()}
        intervals = {
            variant: mean_ci(values, resamples=options.resamples, clusters=patients)
            for variant, values in dices.items()
        }
        quality = quality_figures(means, intervals, served)
    seconds = round(time.perf_counter() - started, 1)
    results = {}
    for role, entry in graphs.items():
        variants = {variant: {**latency[role][variant], **quality[variant]} for variant in quality}
        results[role] = {
            "kind": SEGMENTATION,
            "metric": "Dice" if options.dice else "Dice (not measured: --no-dice)",
            "metric_of": "the segmenter and the refiner of the same variant, as served",
            "served": SERVED_VARIANT[entry.parameters["precision"]],
            "validation": {"images": len(validation), "patients": len(set(patients))},
            "calibration_inputs": len(calibration[role]),
            "variants": variants,
            "fastest_holding": fastest_holding(variants),
            "seconds": seconds,
        }
        progress(
            f"precision: {role}: "
            + ", ".join(
                f"{v} {f['median_ms']:.1f} ms Dice {f['value'] or float('nan'):.3f}" for v, f in variants.items()
            )
            + f" (with the {'refiner' if role == SEGMENTER_ROLE else 'segmenter'}: {seconds:.0f} s)"
        )
    return results


def served_roles(entries: Mapping[str, Any], pipelines: Any) -> tuple[str, ...]:
    """The family graphs of the manifest's default US pipeline (a consensus brings its members), in serving order."""
    from models.inference.manifest import NetworkSpec
    from models.inference.pipeline import default_families_of, with_consensus_members

    chosen = with_consensus_members(default_families_of(pipelines, entries, "US"), entries)
    return tuple(role for role in chosen if isinstance(entries[role].spec, NetworkSpec))


def run_precision(options: PrecisionOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every variant of every served US graph: latency, validation figure, the fastest that holds."""
    import onnxruntime

    from models.inference.pipeline import REFINER_ROLE, SEGMENTER_ROLE
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest_and_pipelines

    # The quantisation tool logs advice at WARNING through the root logger on every call; the run's own lines say
    # what was done.
    logging.getLogger().setLevel(logging.ERROR)
    started = time.perf_counter()
    model_dir = options.model_dir or BUNDLED_MODEL_DIR
    entries, pipelines = read_manifest_and_pipelines(model_dir)
    families = served_roles(entries, pipelines)
    everything = (*families, SEGMENTER_ROLE, *((REFINER_ROLE,) if REFINER_ROLE in entries else ()))
    wanted = options.roles or everything
    unknown = sorted(set(wanted) - set(everything))
    if unknown:
        raise PrecisionError(f"not a served US graph: {', '.join(unknown)} (these are: {', '.join(everything)})")
    progress(f"precision: {', '.join(r for r in everything if r in wanted)}; variants {', '.join(VARIANTS)}")
    models: dict[str, Any] = {}
    for role in families:
        if role in wanted:
            models[role] = measure_family(entries[role], model_dir, options, progress)
    if SEGMENTER_ROLE in wanted or REFINER_ROLE in wanted:
        models.update(measure_segmentation(entries, model_dir, options, progress))
    return {
        "variants": {
            "fp32": "all float32 (initializers, constants, casts, inputs and outputs upcast; int8-stored weights "
            "folded)",
            "fp16": "float16 compute: the bundled graph where it is float16, else onnxconverter-common's conversion",
            "int8": (
                "ONNX Runtime static quantisation, QDQ, calibrated (MinMax) on training-split inputs"
                if options.int8.method == "static"
                else "ONNX Runtime dynamic quantisation (ConvInteger, MatMulInteger)"
            ),
        },
        "int8": asdict(options.int8) | {"activations": "uint8", "weights": "int8"},
        "sessions": "models.inference.backend.OnnxRuntimeBackend defaults, as the worker: intra_op_num_threads 0 "
        "(ONNX Runtime's default), ORT_ENABLE_ALL, CPUExecutionProvider",
        "latency": {
            "rounds": options.rounds,
            "inputs": LATENCY_INPUTS,
            "order": "every variant once per round, order rotated each round",
        },
        "validation": "the project's validation split (models.datasets); the test split is not read",
        "interval": f"95 % percentile bootstrap over patients, {options.resamples} resamples",
        "holds": "the variant's figure lies inside the served variant's interval",
        "calibration": options.calibration,
        "datasets": str(options.datasets),
        "packages": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "models": models,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    defaults = PrecisionOptions()
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=defaults.datasets, help="the development datasets")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="timed latency rounds per graph (30)")
    parser.add_argument(
        "--calibration", type=int, default=defaults.calibration, help="training inputs calibrating int8 (200)"
    )
    parser.add_argument("--resamples", type=int, default=defaults.resamples, help="bootstrap resamples (1000)")
    parser.add_argument("--roles", default="", help="comma-separated graphs (default: every served US graph)")
    parser.add_argument("--int8", choices=("static", "dynamic"), default="static", help="quantisation (static)")
    parser.add_argument("--int8-ops", default="", help="comma-separated operator types to quantise (default: all)")
    parser.add_argument("--no-dice", action="store_true", help="time the segmenter and refiner, skip their Dice")
    parser.add_argument("--json", type=Path, help="write the results here as JSON (else to stdout)")
    args = parser.parse_args(argv)
    options = PrecisionOptions(
        datasets=args.datasets.resolve(),
        rounds=args.rounds,
        calibration=args.calibration,
        resamples=args.resamples,
        roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()),
        int8=Int8Settings(method=args.int8, op_types=tuple(o.strip() for o in args.int8_ops.split(",") if o.strip())),
        dice=not args.no_dice,
    )
    result = run_precision(options, lambda line: print(line, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
