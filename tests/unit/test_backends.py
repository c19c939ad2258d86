"""Backend selection, the TensorRT engine cache key, and the settings and start-up around them (all on the CPU).

What is installed comes into :func:`choose_backend` as an :class:`Availability`, so every branch runs here
without a GPU; the TensorRT and CUDA paths themselves run in tests/gpu/test_tensorrt.py where a GPU is present.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import REGISTRY

from models.errors import BackendUnavailable
from models.inference.backend import OnnxRuntimeBackend
from models.inference.backends import (
    BACKEND_CHOICES,
    Availability,
    InferenceRuntime,
    choose_backend,
    probe_availability,
)
from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest
from models.inference.tensorrt_backend import engine_cache_key
from service.errors import ConfigurationError
from service.settings import INFERENCE_BACKENDS, Settings, load_environment

GPU = ("NVIDIA H100 80GB HBM3",)
EVERYTHING = Availability(gpus=GPU, tensorrt_version="10.13.3.9", cuda_python=True, ort_cuda=True)
NOTHING = Availability()
SHA = "ab" * 32


# --- choose_backend -----------------------------------------------------------------------------


def test_auto_prefers_tensorrt_with_the_cuda_provider_as_fallback_for_graphs_it_cannot_take() -> None:
    choice = choose_backend("auto", EVERYTHING)
    assert (choice.kind, choice.fallback) == ("tensorrt", "cuda")
    assert "TensorRT 10.13.3.9" in choice.reason and GPU[0] in choice.reason


def test_auto_without_tensorrt_takes_the_cuda_provider_and_says_why() -> None:
    choice = choose_backend("auto", dataclasses.replace(EVERYTHING, tensorrt_version=None))
    assert choice.kind == "cuda"
    assert "TensorRT is not installed" in choice.reason


def test_auto_without_cuda_python_does_not_take_tensorrt() -> None:
    choice = choose_backend("auto", dataclasses.replace(EVERYTHING, cuda_python=False))
    assert choice.kind == "cuda" and "cuda-python" in choice.reason


def test_auto_without_a_gpu_runs_on_the_cpu_whatever_is_installed() -> None:
    choice = choose_backend("auto", dataclasses.replace(EVERYTHING, gpus=()))
    assert choice.kind == "cpu"
    assert "no CUDA GPU is visible" in choice.reason


def test_auto_on_a_cpu_install_runs_on_the_cpu_and_names_both_missing_pieces() -> None:
    choice = choose_backend("auto", NOTHING)
    assert choice.kind == "cpu"
    assert "TensorRT is not installed" in choice.reason and "no CUDA provider" in choice.reason


def test_tensorrt_without_the_cuda_provider_falls_back_to_the_cpu_for_graphs_it_cannot_take() -> None:
    choice = choose_backend("tensorrt", dataclasses.replace(EVERYTHING, ort_cuda=False))
    assert (choice.kind, choice.fallback) == ("tensorrt", "cpu")


@pytest.mark.parametrize(
    ("requested", "available", "missing"),
    [
        ("tensorrt", dataclasses.replace(EVERYTHING, tensorrt_version=None), "TensorRT is not installed"),
        ("tensorrt", dataclasses.replace(EVERYTHING, cuda_python=False), "cuda-python is not installed"),
        ("tensorrt", dataclasses.replace(EVERYTHING, gpus=()), "no CUDA GPU is visible"),
        ("cuda", dataclasses.replace(EVERYTHING, ort_cuda=False), "no CUDA provider"),
        ("cuda", dataclasses.replace(EVERYTHING, gpus=()), "no CUDA GPU is visible"),
    ],
)
def test_an_explicit_choice_that_cannot_run_here_is_refused_not_replaced(
    requested: str, available: Availability, missing: str
) -> None:
    with pytest.raises(BackendUnavailable, match=f"inference_backend = {requested}, but .*{missing}"):
        choose_backend(requested, available)


def test_explicit_choices_that_can_run_are_taken() -> None:
    assert choose_backend("tensorrt", EVERYTHING).kind == "tensorrt"
    assert choose_backend("cuda", EVERYTHING).kind == "cuda"
    assert choose_backend("cpu", EVERYTHING).kind == "cpu"  # the CPU even where a GPU is there


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(BackendUnavailable, match="must be one of"):
        choose_backend("gpu", EVERYTHING)


def test_this_machine_is_probed_as_onnx_runtime_lists_its_providers() -> None:
    available = probe_availability()
    assert available.ort_cuda == ("CUDAExecutionProvider" in ort.get_available_providers())
    assert all(isinstance(name, str) and name for name in available.gpus)


# --- the engine cache key -----------------------------------------------------------------------


def test_the_engine_key_is_a_file_name_that_changes_with_every_field() -> None:
    key = engine_cache_key("NVIDIA H100 80GB HBM3", "10.13.3.9", SHA, "fp16", 8)
    assert key == f"NVIDIA-H100-80GB-HBM3_trt10.13.3.9_fp16_b8_{SHA}.engine"
    assert engine_cache_key("NVIDIA H100 80GB HBM3", "10.13.3.9", SHA, "fp16", 8) == key  # pure
    others = {
        engine_cache_key("NVIDIA A100-SXM4-40GB", "10.13.3.9", SHA, "fp16", 8),
        engine_cache_key("NVIDIA H100 80GB HBM3", "10.12.0.36", SHA, "fp16", 8),
        engine_cache_key("NVIDIA H100 80GB HBM3", "10.13.3.9", "cd" * 32, "fp16", 8),
        engine_cache_key("NVIDIA H100 80GB HBM3", "10.13.3.9", SHA, "fp32", 8),
        engine_cache_key("NVIDIA H100 80GB HBM3", "10.13.3.9", SHA, "fp16", 1),
    }
    assert key not in others and len(others) == 5


def test_the_engine_key_never_leaves_its_folder() -> None:
    key = engine_cache_key("../../etc/GPU name/with spaces", "10/1", SHA, "fp16", 1)
    assert "/" not in key and not key.startswith(".") and " " not in key


@pytest.mark.parametrize(
    ("gpu", "version", "sha", "precision", "batch"),
    [
        ("", "10.0", SHA, "fp16", 1),
        ("GPU", "", SHA, "fp16", 1),
        ("GPU", "10.0", "ABC", "fp16", 1),
        ("GPU", "10.0", SHA.upper(), "fp16", 1),
        ("GPU", "10.0", SHA, "int8", 1),
        ("GPU", "10.0", SHA, "fp16", 0),
    ],
)
def test_the_engine_key_refuses_what_cannot_name_an_engine(
    gpu: str, version: str, sha: str, precision: str, batch: int
) -> None:
    with pytest.raises(ValueError):
        engine_cache_key(gpu, version, sha, precision, batch)


# --- the runtime the loaders take ---------------------------------------------------------------


def test_the_cpu_runtime_serves_what_onnx_runtime_serves_and_records_where_each_model_went() -> None:
    entry = read_manifest()["dl_u"]
    runtime = InferenceRuntime()
    backend = runtime.open(entry)
    image = np.random.default_rng(0).standard_normal((1, 1, 96, 96)).astype(np.float32)
    bare = OnnxRuntimeBackend(BUNDLED_MODEL_DIR / entry.file)
    for name, value in bare.run({"image": image}).items():
        np.testing.assert_array_equal(backend.run({"image": image})[name], value)
    placement = runtime.placements()[entry.name]
    assert (placement.backend, placement.batching) == ("cpu", "off (inference_max_batch = 1)")


def test_sessions_do_not_spin_waiting_for_their_next_run() -> None:
    # A worker holds a dozen sessions, each with its own intra-op pool: spinning pools took the cores from the
    # graph that ran next (bench/README.md, "Top costs").
    session = OnnxRuntimeBackend(BUNDLED_MODEL_DIR / "dl_u.onnx")._session
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this ONNX Runtime has the CUDA provider"
)
def test_a_cuda_runtime_refuses_a_session_that_onnx_runtime_put_on_the_cpu() -> None:
    # ONNX Runtime drops a provider it does not have with a warning; the runtime must not let that pass.
    with pytest.raises(BackendUnavailable, match="could not start its CUDA provider"):
        InferenceRuntime("cuda").open(read_manifest()["dl_u"])


def test_a_model_the_tensorrt_backend_refuses_goes_to_the_fallback_and_its_placement_says_why(tmp_path: Path) -> None:
    # The mammography finder takes images of any height and width, which no one engine profile covers; where
    # TensorRT is not installed at all (here) it is refused for that reason instead. Either way: the fallback.
    entry = read_manifest()["mg_finder"]
    runtime = InferenceRuntime("tensorrt", fallback="cpu", engine_cache_dir=tmp_path, reason="test")
    backend = runtime.open(entry)
    image = np.zeros((1, 1, 64, 64), np.float32)
    assert backend.run({"image": image})["logits"].shape == (1, 1, 64, 64)
    placement = runtime.placements()[entry.name]
    assert placement.backend == "cpu"
    assert placement.reason.startswith("TensorRT cannot take this graph")


def test_a_runtime_refuses_settings_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="engine cache"):
        InferenceRuntime("tensorrt")
    with pytest.raises(ValueError, match="max_batch"):
        InferenceRuntime(max_batch=0)
    with pytest.raises(ValueError, match="unknown backend"):
        InferenceRuntime("gpu")  # type: ignore[arg-type]


# --- settings and start-up ------------------------------------------------------------------------


def test_the_settings_offer_the_choices_the_selection_knows() -> None:
    assert INFERENCE_BACKENDS == BACKEND_CHOICES


def test_gpu_settings_default_to_what_a_cpu_worker_did_before() -> None:
    settings = Settings()
    assert settings.inference_backend == "auto"  # the CPU on a CPU install
    assert (settings.inference_max_batch, settings.worker_concurrency) == (1, 1)
    assert settings.engine_cache_dir == Path("var/engines")


def test_gpu_settings_come_from_the_environment() -> None:
    values = load_environment(
        {
            "BREASTAI_INFERENCE_BACKEND": "tensorrt",
            "BREASTAI_ENGINE_CACHE_DIR": "/cache/engines",
            "BREASTAI_INFERENCE_MAX_BATCH": "8",
            "BREASTAI_INFERENCE_MAX_WAIT_MS": "3.5",
            "BREASTAI_WORKER_CONCURRENCY": "4",
        }
    )
    settings = Settings(**values)
    assert settings.inference_backend == "tensorrt" and settings.engine_cache_dir == Path("/cache/engines")
    assert (settings.inference_max_batch, settings.inference_max_wait_ms, settings.worker_concurrency) == (8, 3.5, 4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("inference_backend", "gpu"),
        ("inference_max_batch", 0),
        ("inference_max_batch", 1000),
        ("inference_max_wait_ms", -1.0),
        ("worker_concurrency", 0),
    ],
)
def test_bad_gpu_settings_stop_the_start(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Settings(**{field: value})  # type: ignore[arg-type]


@pytest.mark.skipif(probe_availability().tensorrt_missing() is None, reason="TensorRT can run on this machine")
def test_a_worker_asked_for_tensorrt_where_it_cannot_run_refuses_to_start() -> None:
    from workers.cli import _runtime

    with pytest.raises(ConfigurationError, match="inference_backend = tensorrt, but"):
        _runtime(Settings(inference_backend="tensorrt"))


def test_the_worker_exports_where_each_model_runs(tmp_path: Path) -> None:
    from workers.cli import _job_handler

    _job_handler(Settings(inference_backend="cpu", spool_dir=tmp_path / "spool"))
    for role in ("us_segmenter", "dl_u", "mg_finder", "abvs_three_plane"):
        name = read_manifest()[role].name
        assert REGISTRY.get_sample_value("breastai_inference_backend_info", {"model": name, "backend": "cpu"}) == 1


@pytest.mark.parametrize("precision", ["typed", "int8"])
def test_a_tensorrt_engine_is_built_in_fp16_or_fp32_only(precision: str, tmp_path: Path) -> None:
    """ "typed" names a TensorRT 11 engine in the cache; asking for it on TensorRT 10 would file fp32 under it."""
    from models.inference.tensorrt_backend import TensorRTBackend

    with pytest.raises(ValueError, match="precision"):
        TensorRTBackend(b"", tmp_path, precision=precision)
