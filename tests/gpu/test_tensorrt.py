"""The GPU backends on a GPU: TensorRT engines (built, cached, batched) and ONNX Runtime's CUDA provider.

Each test runs only where its backend can run (``pip install 'breastai[gpu]'`` and a CUDA GPU for TensorRT;
onnxruntime-gpu and a GPU for the CUDA provider) and is skipped elsewhere with the reason, which ``pytest -rs``
(pyproject's addopts) prints in the summary. Outputs are compared with ONNX Runtime on the CPU within fp16
tolerance: an fp16 engine is not bit-identical to the CPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from models.errors import BackendUnavailable
from models.inference.backend import Arrays, OnnxRuntimeBackend
from models.inference.backends import InferenceRuntime, choose_backend, probe_availability
from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest

AVAILABLE = probe_availability()
TENSORRT_MISSING = AVAILABLE.tensorrt_missing()
CUDA_MISSING = AVAILABLE.cuda_missing()
needs_tensorrt = pytest.mark.skipif(
    TENSORRT_MISSING is not None, reason=f"TensorRT cannot run here: {TENSORRT_MISSING}"
)
needs_cuda_provider = pytest.mark.skipif(
    CUDA_MISSING is not None, reason=f"ONNX Runtime's CUDA provider cannot run here: {CUDA_MISSING}"
)
pytestmark = pytest.mark.gpu

FP16_TOLERANCE = 2e-2  # of the output's scale (at least 1): fp16 kernels against fp32-accumulating CPU ones


def _close(got: Arrays, expected: Arrays) -> None:
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        scale = max(1.0, float(np.max(np.abs(value))))
        np.testing.assert_allclose(got[name], value, rtol=FP16_TOLERANCE, atol=FP16_TOLERANCE * scale, err_msg=name)


def _images(count: int, side: int = 96, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((count, 1, side, side)).astype(np.float32)


@needs_tensorrt
def test_auto_chooses_tensorrt_here() -> None:
    assert choose_backend("auto", AVAILABLE).kind == "tensorrt"


@needs_tensorrt
def test_an_engine_is_built_once_then_loaded_from_its_cache_and_serves_what_the_cpu_serves(tmp_path: Path) -> None:
    from models.inference.tensorrt_backend import TensorRTBackend

    entry = read_manifest()["dl_u"]
    model = (BUNDLED_MODEL_DIR / entry.file).read_bytes()
    cpu = OnnxRuntimeBackend(BUNDLED_MODEL_DIR / entry.file)
    first = TensorRTBackend(model, tmp_path)
    assert first.built and first.cache_path.is_file() and first.cache_path.parent == tmp_path
    image = _images(1)
    _close(first.run({"image": image}), cpu.run({"image": image}))
    again = TensorRTBackend(model, tmp_path)
    assert not again.built and again.cache_path == first.cache_path
    _close(again.run({"image": image}), cpu.run({"image": image}))
    first.close()
    again.close()


@needs_tensorrt
def test_a_damaged_cached_engine_is_rebuilt(tmp_path: Path) -> None:
    from models.inference.tensorrt_backend import TensorRTBackend

    entry = read_manifest()["dl_u"]
    model = (BUNDLED_MODEL_DIR / entry.file).read_bytes()
    built = TensorRTBackend(model, tmp_path)
    built.close()
    built.cache_path.write_bytes(b"not an engine")
    rebuilt = TensorRTBackend(model, tmp_path)
    assert rebuilt.built and rebuilt.cache_path.stat().st_size > 1000
    rebuilt.close()


@needs_tensorrt
def test_a_dynamic_batch_engine_batches_and_chunks_what_is_larger_than_its_profile(tmp_path: Path) -> None:
    from models.inference.batch_axis import with_symbolic_batch
    from models.inference.tensorrt_backend import TensorRTBackend

    entry = read_manifest()["dl_u"]
    path = BUNDLED_MODEL_DIR / entry.file
    engine = TensorRTBackend(with_symbolic_batch(path.read_bytes()), tmp_path, max_batch=4)
    assert "_b4_" in engine.cache_path.name
    cpu = OnnxRuntimeBackend(path)
    images = _images(6)  # more than the profile's 4: two runs
    expected = {
        name: np.concatenate([cpu.run({"image": images[i : i + 1]})[name] for i in range(6)])
        for name in cpu.output_names
    }
    _close(engine.run({"image": images}), expected)
    engine.close()


@needs_tensorrt
def test_a_graph_with_dynamic_sizes_besides_the_batch_is_refused_by_tensorrt(tmp_path: Path) -> None:
    from models.inference.tensorrt_backend import TensorRTBackend

    entry = read_manifest()["mg_finder"]
    with pytest.raises(BackendUnavailable, match="dynamic dimensions other than the batch"):
        TensorRTBackend((BUNDLED_MODEL_DIR / entry.file).read_bytes(), tmp_path)


@needs_tensorrt
def test_concurrent_callers_batched_on_tensorrt_get_what_they_get_alone(tmp_path: Path) -> None:
    runtime = InferenceRuntime("tensorrt", engine_cache_dir=tmp_path, max_batch=4, max_wait_ms=50.0)
    entry = read_manifest()["dl_u"]
    backend = runtime.open(entry)
    assert runtime.placements()[entry.name].batching == "up to 4 rows"
    cpu = OnnxRuntimeBackend(BUNDLED_MODEL_DIR / entry.file)
    images = _images(4, seed=3)
    results: dict[int, Arrays] = {}

    def call(index: int) -> None:
        results[index] = backend.run({"image": images[index : index + 1]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index in range(4):
        _close(results[index], cpu.run({"image": images[index : index + 1]}))


@needs_tensorrt
def test_concurrent_callers_reach_the_engine_together(tmp_path: Path) -> None:
    from models.inference.batch_axis import with_symbolic_batch
    from models.inference.batching import BatchingBackend
    from models.inference.tensorrt_backend import TensorRTBackend
    from tests.unit.test_batching import Counting

    entry = read_manifest()["dl_u"]
    engine = Counting(TensorRTBackend(with_symbolic_batch((BUNDLED_MODEL_DIR / entry.file).read_bytes()), tmp_path, 4))
    batched = BatchingBackend(engine, max_batch=4, max_wait_s=0.5)
    images = _images(4, seed=5)
    start = threading.Barrier(4)

    def call(index: int) -> None:
        start.wait()
        batched.run({"image": images[index : index + 1]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sum(engine.rows) == 4 and max(engine.rows) > 1, f"rows per engine call: {engine.rows}"


@needs_tensorrt
def test_the_bmode_pipeline_on_tensorrt_finds_what_it_finds_on_the_cpu(tmp_path: Path) -> None:
    import cv2

    from models.inference.pipeline import load_bmode_pipeline

    runtime = InferenceRuntime("tensorrt", engine_cache_dir=tmp_path, fallback="cpu")
    gpu, cpu = load_bmode_pipeline(None, runtime), load_bmode_pipeline()
    image = np.full((360, 480), 120, np.uint8)
    cv2.ellipse(image, (240, 180), (60, 40), 0, 0, 360, 25, -1)
    on_gpu, on_cpu = gpu.analyse(image), cpu.analyse(image)
    assert len(on_gpu.lesions) == len(on_cpu.lesions)
    for a, b in zip(on_gpu.lesions, on_cpu.lesions, strict=True):
        for x, y in zip(a.family_scores, b.family_scores, strict=True):
            assert abs(x.probability - y.probability) < 0.05, x.family
    assert {p.backend for p in runtime.placements().values()} == {"tensorrt"}


@needs_cuda_provider
def test_the_cuda_provider_serves_what_the_cpu_serves() -> None:
    entry = read_manifest()["dl_u"]
    runtime = InferenceRuntime("cuda")
    backend = runtime.open(entry)
    assert isinstance(backend, OnnxRuntimeBackend) and "CUDAExecutionProvider" in backend.providers
    image = _images(1, seed=5)
    _close(backend.run({"image": image}), OnnxRuntimeBackend(BUNDLED_MODEL_DIR / entry.file).run({"image": image}))
    assert runtime.placements()[entry.name].backend == "cuda"
