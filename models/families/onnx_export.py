"""One way to write a family's serving graph to ONNX."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

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
) -> Path:
    """Trace ``wrapper`` on ``example`` with the TorchScript exporter (``dynamo=False``).

    The dynamo exporter of torch 2.x builds at opset 18 and fails to convert
    some of these graphs down; the TorchScript one is what every family's
    parity test checks. Shapes read during tracing (feature-map sizes, the
    top-k clip) become constants of the graph, which is what a fixed serving
    input size wants, so the tracer's warning about them is silenced.
    """
    dynamic = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python", category=Warning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export", category=Warning)
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
