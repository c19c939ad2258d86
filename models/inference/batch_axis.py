"""A symbolic batch axis for graphs exported with a fixed batch of one.

The bundled graphs were exported for one image at a time: their inputs and
outputs declare a leading dimension of 1. Running several items in one call
(:mod:`models.inference.batching`), or a TensorRT engine with a dynamic
batch profile (:mod:`models.inference.tensorrt_backend`), needs that axis
symbolic. :func:`with_symbolic_batch` returns a copy of the model whose
graph inputs and outputs have a named leading dimension instead; nothing
else changes (same nodes, same weights), and the files on disk are never
rewritten: the copy is made in memory when a model is loaded.

Renaming the axis is enough only where the graph never fixes the batch
inside (a ``Reshape`` to a constant ``[1, -1]``, a reduction over axis 0):
:func:`models.inference.batching.batch_inconsistency` checks that, on the
backend that will serve the graph, before any batch is formed.

Needs the ``onnx`` package (the ``gpu`` and ``train`` extras), imported on
first use: a serving install without it runs every graph one item per call.
"""

from __future__ import annotations

from typing import Any

BATCH_AXIS = "batch"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # the CPU serving install has no onnx
        from models.errors import BackendUnavailable

        raise BackendUnavailable(
            "batching needs the onnx package to give a graph a symbolic batch axis (pip install 'breastai[gpu]'), "
            f"or inference_max_batch = 1: {exc}"
        ) from exc
    return onnx


def with_symbolic_batch(model: bytes, axis: str = BATCH_AXIS) -> bytes:
    """A copy of the serialised ONNX ``model`` whose graph inputs and outputs have a symbolic leading dimension.

    Parameters
    ----------
    model
        The serialised ``ModelProto`` (a ``.onnx`` file's bytes).
    axis
        The name given to the leading dimension (ONNX ``dim_param``).

    Returns
    -------
    bytes
        The serialised copy. Graph inputs that are initializers (weights
        listed as inputs by old exporters) keep their shape; tensors of rank
        0 have no axis to rename and are left as they are. The graph's
        ``value_info`` (optional shape hints, which still say 1) is dropped:
        ONNX Runtime and TensorRT infer those shapes again.

    Raises
    ------
    BackendUnavailable
        The ``onnx`` package is not installed.
    """
    onnx = _onnx()
    proto = onnx.load_model_from_string(model)
    weights = {initializer.name for initializer in proto.graph.initializer}
    for value in (*proto.graph.input, *proto.graph.output):
        if value.name in weights or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 0:
            continue
        # dim_value and dim_param are one protobuf "oneof": setting the name clears the fixed size.
        dims[0].dim_param = axis
    del proto.graph.value_info[:]
    data: bytes = proto.SerializeToString()
    return data


def input_shapes(model: bytes) -> dict[str, tuple[int | None, ...]]:
    """Each graph input's shape (``None`` for a symbolic or unknown dimension), weights excluded, in graph order.

    Raises
    ------
    BackendUnavailable
        The ``onnx`` package is not installed.
    """
    onnx = _onnx()
    proto = onnx.load_model_from_string(model)
    weights = {initializer.name for initializer in proto.graph.initializer}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for value in proto.graph.input:
        if value.name in weights:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims)
    return shapes
