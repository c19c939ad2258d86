"""One way to write a family's serving graph to ONNX."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import torch
from torch import nn


def export_graph(
    wrapper: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = 18,
    dynamic_batch: bool = False,
    dynamic_sides: bool = False,
) -> Path:
    """Trace ``wrapper`` on ``example`` with the TorchScript exporter (``dynamo=False``).

    The dynamo exporter of torch 2.x builds at opset 18 and fails to convert
    some of these graphs down; the TorchScript one is what every family's
    parity test checks. Shapes read during tracing (feature-map sizes, the
    top-k clip) become constants of the graph, which is what a fixed serving
    input size wants, so the tracer's warning about them is silenced.
    ``dynamic_sides`` leaves the height and width (axes 2 and 3) of every
    input and output free, for a fully convolutional graph (the mammography
    finder) whose shapes never enter a constant.
    """
    axes = {**({0: "batch"} if dynamic_batch else {}), **({2: "height", 3: "width"} if dynamic_sides else {})}
    dynamic = {name: axes for name in (*input_names, *output_names)} if axes else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python", category=Warning)
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export", category=Warning
        )
        torch.onnx.export(
            wrapper,
            example,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    return path


#: Weights smaller than this stay as they are: biases and small heads cost little and gain nothing.
INT8_MIN_ELEMENTS = 4096


def int8_convolution_weights(
    model: onnx.ModelProto, min_elements: int = INT8_MIN_ELEMENTS
) -> tuple[onnx.ModelProto, int]:
    """Store every large Conv weight as int8 with one scale per output channel.

    Each weight ``W`` (O, I, kh, kw) becomes ``q = round(W / s)`` with
    ``s[o] = max|W[o]| / 127`` (symmetric, per output channel), and the graph
    rebuilds ``W' = Cast(q) * s`` in float32, cast back to the weight's own
    type. Only constants feed those nodes, so ONNX Runtime folds them once
    when the session starts (in float32: its CPU kernels have no float16
    ``Mul`` to fold with): inference runs the same float convolutions as before,
    and the file holds one byte per weight instead of two (fp16) or four.
    Per-output-channel symmetric int8 is the weight scheme of ONNX's own
    quantisation (``DequantizeLinear`` with ``axis=0``); plain ``Cast`` and
    ``Mul`` are used because ONNX Runtime does not constant-fold
    ``DequantizeLinear`` and would otherwise dequantise on every call.

    Returns
    -------
    tuple[onnx.ModelProto, int]
        A new model (the input is not changed) and how many weights were stored as int8.
    """
    from onnx import helper, numpy_helper

    compressed = onnx.ModelProto()
    compressed.CopyFrom(model)
    graph = compressed.graph
    users: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            users.setdefault(name, []).append((node.op_type, position))
    kept, rebuild, count = [], [], 0
    for initializer in graph.initializer:
        weight = numpy_helper.to_array(initializer)
        is_conv_weight = bool(users.get(initializer.name)) and all(
            use == ("Conv", 1) for use in users[initializer.name]
        )
        if (
            not is_conv_weight
            or weight.ndim < 2
            or weight.size < min_elements
            or weight.dtype not in (np.float16, np.float32)
        ):
            kept.append(initializer)
            continue
        scale, quantised = _int8_per_channel(weight.astype(np.float32))
        name = initializer.name
        kept += [numpy_helper.from_array(quantised, f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_scale")]
        rebuild += [
            helper.make_node("Cast", [f"{name}_int8"], [f"{name}_fp32"], to=onnx.TensorProto.FLOAT),
            helper.make_node(
                "Mul", [f"{name}_fp32", f"{name}_scale"], [f"{name}_scaled" if weight.dtype != np.float32 else name]
            ),
        ]
        if weight.dtype != np.float32:
            rebuild.append(
                helper.make_node("Cast", [f"{name}_scaled"], [name], to=helper.np_dtype_to_tensor_dtype(weight.dtype))
            )
        count += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = rebuild + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(compressed)
    return compressed, count


def _int8_per_channel(weight: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """Symmetric int8 per output channel, each channel's clipping range chosen to minimise its squared error.

    The range is searched from the channel's peak down to 50 % of it: clipping
    a few outlying weights buys finer steps for all the others, the usual
    trade in post-training weight quantisation.
    """
    rows = weight.reshape(weight.shape[0], -1)
    peak = np.abs(rows).max(axis=1)
    best_scale = np.where(peak > 0, peak / 127.0, 1.0)
    best_error = np.full(len(rows), np.inf)
    for fraction in np.linspace(1.0, 0.5, 26):
        scale = np.where(peak > 0, fraction * peak / 127.0, 1.0)
        restored = np.clip(np.rint(rows / scale[:, None]), -127, 127) * scale[:, None]
        error = ((restored - rows) ** 2).sum(axis=1)
        better = error < best_error
        best_scale, best_error = np.where(better, scale, best_scale), np.where(better, error, best_error)
    quantised = np.clip(np.rint(rows / best_scale[:, None]), -127, 127).astype(np.int8).reshape(weight.shape)
    return best_scale.astype(np.float32).reshape((-1,) + (1,) * (weight.ndim - 1)), quantised
