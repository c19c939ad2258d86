"""One inference Backend protocol, and its ONNX Runtime implementation.

Every backend (ONNX Runtime on CPU, TensorRT engines built from the same
ONNX file, PyTorch for development) takes named float32 arrays and returns
named arrays, so the pipelines never know which one runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

Arrays = dict[str, npt.NDArray[np.float32]]


class Backend(Protocol):
    """Runs one model: named inputs in, named outputs out."""

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the model's outputs, in graph order."""
        ...

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        """Run the model once; outputs are float32 whatever the internal precision."""
        ...


class OnnxRuntimeBackend:
    """ONNX Runtime session over one ``.onnx`` file.

    Parameters
    ----------
    path
        The model file, or the serialised model itself (e.g. a copy with a
        symbolic batch axis, :func:`models.inference.batch_axis.with_symbolic_batch`).
    providers
        ONNX Runtime execution providers in order of preference; CPU is
        always appended so a missing GPU falls back instead of failing.
    intra_op_threads
        Threads per inference; 0 lets ONNX Runtime decide.
    """

    def __init__(
        self, path: Path | bytes, providers: Sequence[str] = ("CPUExecutionProvider",), intra_op_threads: int = 0
    ) -> None:
        import onnxruntime as ort  # imported here so that importing models stays light

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # No spin-waiting for the next run: every session has its own intra-op thread pool, whose threads by default
        # spin on a core for a while after each run (ONNX Runtime docs, "Thread management"). A worker holds a
        # dozen sessions and runs them one after another between host work, so those spinning threads took the
        # cores from the next graph and from the writers: on the 2-core machine the bench's analysis went from
        # 573-648 to 234-243 ms an image with this (bench/README.md, "Top costs").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's own warnings (e.g. an fp16 constant it cannot fold) go to stderr unstructured, once per session
        # start; they say nothing an operator can act on, so only errors are let through.
        options.log_severity_level = 3
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        model = path if isinstance(path, bytes) else str(path)
        self._session = ort.InferenceSession(model, sess_options=options, providers=chosen)
        self._input_types = {i.name: i.type for i in self._session.get_inputs()}
        self._output_names = tuple(o.name for o in self._session.get_outputs())

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._output_names

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers the session runs on, as ONNX Runtime reports them (a listed provider that
        could not start, e.g. CUDA without a GPU, is missing here: ONNX Runtime falls back without raising)."""
        return tuple(self._session.get_providers())

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        feed = {
            name: value.astype(np.float16 if self._input_types[name] == "tensor(float16)" else np.float32)
            for name, value in inputs.items()
        }
        outputs = self._session.run(list(self._output_names), feed)
        named = zip(self._output_names, outputs, strict=True)
        return {name: np.asarray(value, dtype=np.float32) for name, value in named}
