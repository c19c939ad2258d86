"""TensorRT engines built from the served ONNX files, cached on disk.

Written against the TensorRT 10 Python API (``tensorrt``: ``Builder``,
``OnnxParser``, ``IOptimizationProfile.set_shape``,
``Builder.build_serialized_network``, ``Runtime.deserialize_cuda_engine``,
and the name-based I/O of ``IExecutionContext``: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), with device memory from
NVIDIA's ``cuda-python`` runtime bindings (``cudaMalloc``,
``cudaMemcpyAsync``, ``cudaStreamSynchronize``), as TensorRT's own Python
samples use them. ``cuda-python`` rather than torch: torch is not part of
the serving install, and a few hundred MB of CUDA torch for three memory
calls is no trade. Both come with the ``gpu`` extra; nothing here is
imported by a CPU install.

Precision: the engine runs fp16. On TensorRT 10 the network is built
weakly typed with ``BuilderFlag.FP16``, so fp32 graphs get fp16 kernels
too; TensorRT 11 removed weak typing, and there the network is strongly
typed, so each layer keeps the precision its ONNX graph declares (the
bundled classifiers and segmenters are fp16 already; the three-plane model
is fp32; the mammography finder, whose height and width are open, is not
built at all and runs on the fallback). Callers see float32 outputs either way,
as with ONNX Runtime.

Engines are cached under a folder, one file per
:func:`engine_cache_key` (GPU model, TensorRT version, model sha256,
precision, largest batch): an engine is only valid for the GPU model and
TensorRT version that built it, and a changed model file or batch limit
needs a new one. A cached engine that TensorRT refuses to load is rebuilt.

Not run in this project's CI (no GPU there): tests/gpu/test_tensorrt.py runs
it where ``tensorrt`` and a GPU are present.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import BackendUnavailable
from models.inference.backend import Arrays

PRECISIONS = ("fp16", "fp32", "typed")  # typed: a strongly typed network, each layer in its graph's precision
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9.]+")


def engine_cache_key(gpu_name: str, tensorrt_version: str, model_sha256: str, precision: str, max_batch: int) -> str:
    """The cache file name of an engine: everything that makes one engine unusable in place of another.

    Parameters
    ----------
    gpu_name
        The GPU model as the driver names it (``"NVIDIA H100 80GB HBM3"``):
        TensorRT engines are specific to the GPU they were built on.
    tensorrt_version
        ``tensorrt.__version__``: an engine only loads in the TensorRT that built it.
    model_sha256
        The sha256 of the ONNX bytes TensorRT parses (the file's, or of its copy with a batch axis).
    precision
        ``"fp16"``, ``"fp32"``, or ``"typed"`` (strongly typed: each layer in its graph's precision).
    max_batch
        The optimisation profile's largest batch.

    Returns
    -------
    str
        A file name (letters, digits, ``.``, ``_``, ``-``), ending ``.engine``.

    Raises
    ------
    ValueError
        An empty GPU name or TensorRT version, a sha256 that is not 64 lowercase hex digits, an unknown precision,
        or ``max_batch`` below 1.
    """
    gpu = _UNSAFE.sub("-", gpu_name.strip()).strip("-.")  # no leading dot: never a hidden file
    version = _UNSAFE.sub("-", tensorrt_version.strip()).strip("-.")
    if not gpu or not version:
        raise ValueError(f"an engine key needs a GPU name and a TensorRT version: {gpu_name!r}, {tensorrt_version!r}")
    if not _SHA256.match(model_sha256):
        raise ValueError(f"model sha256 must be 64 lowercase hex digits: {model_sha256!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}: {precision!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1: {max_batch!r}")
    return f"{gpu}_trt{version}_{precision}_b{max_batch}_{model_sha256}.engine"


def _cudart() -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (cuda-python 12.6 on), ``cuda.cudart`` before."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise BackendUnavailable(f"TensorRT needs cuda-python (pip install 'breastai[gpu]'): {exc}") from exc
    return runtime


def _checked(cudart: Any, result: Any) -> Any:
    """The value of a cuda-python call, which returns ``(error, value...)``; a CUDA error raises."""
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailable(f"CUDA runtime error: {error}")
    return values[0] if len(values) == 1 else tuple(values)


class _DeviceBuffer:
    """Device memory for one I/O tensor, grown (never shrunk) to the largest batch seen."""

    def __init__(self) -> None:
        self.pointer = 0
        self.size = 0

    def ensure(self, cudart: Any, nbytes: int) -> int:
        if nbytes > self.size:
            self.free(cudart)
            self.pointer = int(_checked(cudart, cudart.cudaMalloc(max(nbytes, 1))))
            self.size = nbytes
        return self.pointer

    def free(self, cudart: Any) -> None:
        if self.pointer:
            _checked(cudart, cudart.cudaFree(self.pointer))
        self.pointer, self.size = 0, 0


class TensorRTBackend:
    """One TensorRT engine over an ONNX graph: named float32 arrays in and out, as every backend.

    Parameters
    ----------
    model
        The serialised ONNX model (the file's bytes, or its copy with a
        symbolic batch axis when ``max_batch`` > 1).
    cache_dir
        Where engines are kept (created if missing).
    max_batch
        The optimisation profile covers batches 1 to ``max_batch`` (optimised
        for ``max_batch``); a call with more rows runs in chunks.
    precision
        ``"fp16"`` (the default) or ``"fp32"``; on a TensorRT without weak
        typing (11 on) the network is strongly typed whatever is asked, and
        the engine's key says ``"typed"``.
    gpu_name
        The GPU model for the cache key (default: the driver's name of device 0).

    Raises
    ------
    BackendUnavailable
        TensorRT or cuda-python is missing, the graph has dynamic dimensions
        other than the batch (no profile would cover them), or TensorRT cannot
        parse or build it (the message has TensorRT's reasons).
    ValueError
        ``precision`` is neither ``"fp16"`` nor ``"fp32"``.
    """

    def __init__(
        self,
        model: bytes,
        cache_dir: Path,
        max_batch: int = 1,
        precision: str = "fp16",
        gpu_name: str | None = None,
    ) -> None:
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be 'fp16' or 'fp32': {precision!r}")
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailable(f"TensorRT is not installed (pip install 'breastai[gpu]'): {exc}") from exc
        self._trt = trt
        self._cudart = _cudart()
        if gpu_name is None:
            from models.inference.gpus import visible_gpus

            gpus = visible_gpus()
            if not gpus:
                raise BackendUnavailable("TensorRT needs a CUDA GPU; the driver lists none")
            gpu_name = gpus[0]
        self.max_batch = max_batch
        # Keyed by the bytes TensorRT parses, not the manifest's file digest: the batch-axis rewrite, or a change to
        # it, gives other bytes and so another engine; and by the precision the build really uses.
        parsed_sha256 = hashlib.sha256(model).hexdigest()
        self._weakly_typed = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11 removed weak typing and this flag
        built_as = precision if self._weakly_typed else "typed"
        self.cache_path = cache_dir / engine_cache_key(gpu_name, trt.__version__, parsed_sha256, built_as, max_batch)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.built = False  # True when this instance built the engine rather than loading it from the cache
        engine = self._cached_engine()
        if engine is None:
            data = self._build(model, precision)
            self._store(data)
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BackendUnavailable(f"TensorRT could not load the engine it just built ({self.cache_path.name})")
            self.built = True
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._output_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._buffers = {n: _DeviceBuffer() for n in names}
        self._stream = _checked(self._cudart, self._cudart.cudaStreamCreate())
        # One execution context and one stream: calls from several threads (the batcher's leaders) take turns.
        self._lock = threading.Lock()

    def _cached_engine(self) -> Any:
        if not self.cache_path.is_file():
            return None
        # None when the file is damaged or was written by another build of TensorRT: rebuilt below.
        return self._runtime.deserialize_cuda_engine(self.cache_path.read_bytes())

    def _build(self, model: bytes, precision: str) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0 if self._weakly_typed else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT cannot parse the graph: {errors}")
        config = builder.create_builder_config()
        if precision == "fp16" and self._weakly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        dynamic = False
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            shape = tuple(int(d) for d in tensor.shape)
            if any(d < 0 for d in shape[1:]):
                raise BackendUnavailable(
                    f"input {tensor.name} has dynamic dimensions other than the batch {shape}: no engine profile "
                    "covers every size it may be given"
                )
            if shape and shape[0] < 0:
                rest = shape[1:]
                profile.set_shape(tensor.name, (1, *rest), (self.max_batch, *rest), (self.max_batch, *rest))
                dynamic = True
        if dynamic:
            config.add_optimization_profile(profile)
        elif self.max_batch > 1:
            raise BackendUnavailable(f"max_batch {self.max_batch} needs a graph with a symbolic batch axis")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailable("TensorRT could not build an engine for the graph (its log says why)")
        return bytes(memoryview(serialized))

    def _store(self, data: bytes) -> None:
        # Written beside and renamed over: another worker loading the same key never reads half an engine.
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            staging.write_bytes(data)
            os.replace(staging, self.cache_path)
        finally:
            staging.unlink(missing_ok=True)

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._output_names

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        """Run the engine; more rows than ``max_batch`` run in chunks. Outputs are float32.

        Raises
        ------
        ValueError
            An input is missing.
        BackendUnavailable
            A CUDA call or the engine failed.
        """
        missing = [name for name in self._inputs if name not in inputs]
        if missing:
            raise ValueError(f"missing inputs {missing}; the engine takes {list(self._inputs)}")
        rows = int(np.shape(inputs[self._inputs[0]])[0])
        if rows <= self.max_batch:
            return self._run_once(inputs)
        chunks = [
            self._run_once({name: inputs[name][start : start + self.max_batch] for name in self._inputs})
            for start in range(0, rows, self.max_batch)
        ]
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in self._output_names}

    def _run_once(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        cudart, context = self._cudart, self._context
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            # Host arrays stay referenced until the stream is synchronised (the copies are asynchronous).
            staged = {
                name: np.ascontiguousarray(np.asarray(inputs[name]).astype(self._dtypes[name], copy=False))
                for name in self._inputs
            }
            for name, host in staged.items():
                if not context.set_input_shape(name, host.shape):
                    raise BackendUnavailable(f"the engine refuses input {name} of shape {host.shape}")
                device = self._buffers[name].ensure(cudart, host.nbytes)
                _checked(cudart, cudart.cudaMemcpyAsync(device, host, host.nbytes, to_device, self._stream))
                context.set_tensor_address(name, device)
            results: dict[str, npt.NDArray[Any]] = {}
            for name in self._output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                results[name] = np.empty(shape, dtype=self._dtypes[name])
                context.set_tensor_address(name, self._buffers[name].ensure(cudart, results[name].nbytes))
            if not context.execute_async_v3(stream_handle=self._stream):
                raise BackendUnavailable("TensorRT failed to run the engine")
            for name, host in results.items():
                device = self._buffers[name].pointer
                _checked(cudart, cudart.cudaMemcpyAsync(host, device, host.nbytes, to_host, self._stream))
            _checked(cudart, cudart.cudaStreamSynchronize(self._stream))
        return {name: np.asarray(value, dtype=np.float32) for name, value in results.items()}

    def close(self) -> None:
        """Free the device buffers and the stream (the engine goes with the object)."""
        with self._lock:
            for buffer in self._buffers.values():
                buffer.free(self._cudart)
            if self._stream is not None:
                _checked(self._cudart, self._cudart.cudaStreamDestroy(self._stream))
                self._stream = None
