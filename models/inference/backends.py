"""Which backend runs the models: the one place that decides, and opens every served graph.

``inference_backend`` (service settings) names a choice:

======== ===========================================================================
auto     TensorRT where it is installed and a GPU is visible; else ONNX Runtime's
         CUDA provider where that build is installed and a GPU is visible; else
         ONNX Runtime on the CPU
tensorrt TensorRT engines (:mod:`models.inference.tensorrt_backend`)
cuda     ONNX Runtime's ``CUDAExecutionProvider``
cpu      ONNX Runtime's ``CPUExecutionProvider`` (the serving install's only one)
======== ===========================================================================

:func:`choose_backend` is pure (what is installed comes in as an
:class:`Availability`), so every branch is tested without a GPU; an
explicit choice that cannot run here raises
:class:`~models.errors.BackendUnavailable` rather than falling back, so a
GPU worker that lost its GPU refuses to start instead of running ten times
slower unnoticed. :func:`probe_availability` looks at the machine.

:class:`InferenceRuntime` is what the loaders take instead of ONNX Runtime
provider names: :meth:`InferenceRuntime.open` verifies a model file, opens
it on the chosen backend (batched when ``max_batch`` > 1), and records
where each model went and why (:meth:`InferenceRuntime.placements`), for
the worker to log and export as a metric. A graph TensorRT cannot take (one
whose inputs have dynamic sizes besides the batch, such as the mammography
finder's) runs on the runtime's ``fallback`` (the CUDA provider where
there is one, else the CPU), and its placement says so.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.errors import BackendUnavailable
from models.inference.backend import Backend, OnnxRuntimeBackend
from models.inference.gpus import visible_gpus
from models.inference.registry import ModelEntry, verified_path

BackendKind = Literal["tensorrt", "cuda", "cpu"]
BACKEND_CHOICES: tuple[str, ...] = ("auto", "tensorrt", "cuda", "cpu")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_PROVIDERS: dict[str, tuple[str, ...]] = {"cuda": (CUDA_PROVIDER, CPU_PROVIDER), "cpu": (CPU_PROVIDER,)}


@dataclass(frozen=True)
class Availability:
    """What this machine offers for inference.

    Attributes
    ----------
    gpus
        CUDA GPUs the driver lists (:func:`visible_gpus`).
    tensorrt_version
        ``tensorrt.__version__``, or None when TensorRT is not importable.
    cuda_python
        cuda-python (device memory for TensorRT) is importable.
    ort_cuda
        ONNX Runtime lists ``CUDAExecutionProvider`` (the onnxruntime-gpu build).
    """

    gpus: tuple[str, ...] = ()
    tensorrt_version: str | None = None
    cuda_python: bool = False
    ort_cuda: bool = False

    def tensorrt_missing(self) -> str | None:
        """Why TensorRT cannot run here, or None."""
        if self.tensorrt_version is None:
            return "TensorRT is not installed (pip install 'breastai[gpu]')"
        if not self.cuda_python:
            return "cuda-python is not installed (pip install 'breastai[gpu]')"
        if not self.gpus:
            return "no CUDA GPU is visible"
        return None

    def cuda_missing(self) -> str | None:
        """Why ONNX Runtime's CUDA provider cannot run here, or None."""
        if not self.ort_cuda:
            return "ONNX Runtime has no CUDA provider (install onnxruntime-gpu in place of onnxruntime)"
        if not self.gpus:
            return "no CUDA GPU is visible"
        return None


def probe_availability() -> Availability:
    """Look at this machine: its GPUs, TensorRT, cuda-python, ONNX Runtime's providers (imports nothing else)."""
    import importlib.util

    import onnxruntime as ort

    try:
        import tensorrt

        version: str | None = str(tensorrt.__version__)
    except ImportError:
        version = None
    cuda_python = importlib.util.find_spec("cuda") is not None and (
        _module_exists("cuda.bindings.runtime") or _module_exists("cuda.cudart")
    )
    return Availability(
        gpus=visible_gpus(),
        tensorrt_version=version,
        cuda_python=cuda_python,
        ort_cuda=CUDA_PROVIDER in ort.get_available_providers(),
    )


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Choice:
    """The backend chosen for the process, why, and where a graph TensorRT cannot take goes instead."""

    kind: BackendKind
    reason: str
    fallback: BackendKind = "cpu"


def choose_backend(requested: str, available: Availability) -> Choice:
    """The backend for ``inference_backend = requested`` on a machine offering ``available``.

    Raises
    ------
    BackendUnavailable
        ``requested`` is not one of :data:`BACKEND_CHOICES`, or names a
        backend this machine cannot run (the message says what is missing).
    """
    if requested not in BACKEND_CHOICES:
        raise BackendUnavailable(f"inference_backend must be one of {BACKEND_CHOICES}: {requested!r}")
    trt_missing = available.tensorrt_missing()
    cuda_missing = available.cuda_missing()
    fallback: BackendKind = "cuda" if cuda_missing is None else "cpu"
    gpu = available.gpus[0] if available.gpus else ""
    if requested == "cpu":
        return Choice("cpu", "inference_backend = cpu")
    if requested == "tensorrt":
        if trt_missing is not None:
            raise BackendUnavailable(f"inference_backend = tensorrt, but {trt_missing}")
        return Choice(
            "tensorrt", f"inference_backend = tensorrt: TensorRT {available.tensorrt_version} on {gpu}", fallback
        )
    if requested == "cuda":
        if cuda_missing is not None:
            raise BackendUnavailable(f"inference_backend = cuda, but {cuda_missing}")
        return Choice("cuda", f"inference_backend = cuda: ONNX Runtime's CUDA provider on {gpu}", "cpu")
    if trt_missing is None:
        return Choice("tensorrt", f"auto: TensorRT {available.tensorrt_version} on {gpu}", fallback)
    if cuda_missing is None:
        return Choice("cuda", f"auto: ONNX Runtime's CUDA provider on {gpu} ({trt_missing})", "cpu")
    return Choice("cpu", f"auto: the CPU ({trt_missing}; {cuda_missing})")


@dataclass(frozen=True)
class Placement:
    """Where one model runs: backend, why, and whether its calls are batched (for logs and the metric)."""

    model: str
    backend: BackendKind
    reason: str
    batching: str


class InferenceRuntime:
    """Opens served graphs on one backend; what the model loaders take.

    Parameters
    ----------
    backend
        Where graphs run (:func:`choose_backend` decides it for a worker).
    fallback
        Where a graph goes that TensorRT cannot take (TensorRT runtimes only).
    engine_cache_dir
        TensorRT's engine cache (required for ``backend = "tensorrt"``).
    max_batch
        1: one call per item, graphs as they are. More: each graph gets a
        symbolic batch axis and a :class:`~models.inference.batching.BatchingBackend`
        that gathers up to this many rows from concurrent callers (needs the ``onnx`` package).
    max_wait_ms
        How long the oldest item waits for a batch to fill.
    reason
        Why this backend (:attr:`Choice.reason`), repeated in each placement.

    Raises
    ------
    ValueError
        An unknown backend, ``max_batch`` below 1, ``max_wait_ms`` below 0, or TensorRT without a cache folder.
    """

    def __init__(
        self,
        backend: BackendKind = "cpu",
        *,
        fallback: BackendKind = "cpu",
        engine_cache_dir: Path | None = None,
        max_batch: int = 1,
        max_wait_ms: float = 2.0,
        reason: str = "",
    ) -> None:
        if backend not in ("tensorrt", "cuda", "cpu") or fallback not in ("cuda", "cpu"):
            raise ValueError(f"unknown backend {backend!r} or fallback {fallback!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1: {max_batch!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0: {max_wait_ms!r}")
        if backend == "tensorrt" and engine_cache_dir is None:
            raise ValueError("a TensorRT runtime needs an engine cache folder")
        self.backend: BackendKind = backend
        self.fallback: BackendKind = fallback
        self.engine_cache_dir = engine_cache_dir
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.reason = reason or f"inference_backend = {backend}"
        self._lock = threading.Lock()
        self._placements: dict[str, Placement] = {}

    @classmethod
    def from_choice(
        cls, choice: Choice, engine_cache_dir: Path | None, max_batch: int = 1, max_wait_ms: float = 2.0
    ) -> InferenceRuntime:
        """The runtime for a :func:`choose_backend` result."""
        return cls(
            choice.kind,
            fallback=choice.fallback,
            engine_cache_dir=engine_cache_dir,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            reason=choice.reason,
        )

    def placements(self) -> Mapping[str, Placement]:
        """Model name -> where :meth:`open` put it (the last time it opened that model)."""
        with self._lock:
            return dict(self._placements)

    def open(self, entry: ModelEntry, model_dir: Path | None = None) -> Backend:
        """The model file of ``entry``, checksum-verified, on this runtime's backend.

        Raises
        ------
        ModelRegistryError
            The file is missing or does not match the manifest's sha256.
        BackendUnavailable
            The backend cannot run the graph (and, for TensorRT, neither can the fallback), or batching was asked
            for without the ``onnx`` package.
        """
        path = verified_path(entry, model_dir)
        batched = self.max_batch > 1
        source: Path | bytes = path
        if batched:
            from models.inference.batch_axis import with_symbolic_batch

            source = with_symbolic_batch(path.read_bytes())
        kind, reason = self.backend, self.reason
        backend: Backend
        if kind == "tensorrt":
            try:
                backend = self._tensorrt(source if isinstance(source, bytes) else path.read_bytes(), entry)
            except BackendUnavailable as exc:
                kind, reason = self.fallback, f"TensorRT cannot take this graph ({exc}); on the {self.fallback} instead"
                backend = self._onnxruntime(kind, source)
        else:
            backend = self._onnxruntime(kind, source)
        batching = "off (inference_max_batch = 1)"
        if batched:
            from models.inference.batch_axis import input_shapes
            from models.inference.batching import BatchingBackend, batch_inconsistency

            assert isinstance(source, bytes)
            refused = batch_inconsistency(backend, input_shapes(source))
            batching = f"up to {self.max_batch} rows" if refused is None else f"off: {refused}"
            backend = BatchingBackend(backend, self.max_batch, self.max_wait_ms / 1000.0, batchable=refused is None)
        with self._lock:
            self._placements[entry.name] = Placement(entry.name, kind, reason, batching)
        return backend

    def _tensorrt(self, model: bytes, entry: ModelEntry) -> Backend:
        from models.inference.tensorrt_backend import TensorRTBackend

        assert self.engine_cache_dir is not None  # checked in __init__
        return TensorRTBackend(model, self.engine_cache_dir, max_batch=self.max_batch)

    def _onnxruntime(self, kind: BackendKind, model: Path | bytes) -> Backend:
        backend = OnnxRuntimeBackend(model, _PROVIDERS[kind])
        if kind == "cuda" and CUDA_PROVIDER not in backend.providers:
            # ONNX Runtime drops a provider that fails to start (no GPU, CUDA libraries missing) with a warning only.
            raise BackendUnavailable(f"ONNX Runtime could not start its CUDA provider (it runs on {backend.providers})")
        return backend


#: The runtime the loaders use when given none: ONNX Runtime on the CPU, one call per item (as before).
CPU_RUNTIME = InferenceRuntime()
