"""The CUDA GPUs this process can see, asked of the driver itself: needed by the backend choice
(models.inference.backends) and by a TensorRT engine's cache key (models.inference.tensorrt_backend)."""

from __future__ import annotations

import ctypes


def visible_gpus() -> tuple[str, ...]:
    """The names of the CUDA GPUs the driver shows this process (``CUDA_VISIBLE_DEVICES`` applies); () without one.

    Asks the driver library itself (``libcuda.so.1``: ``cuInit``,
    ``cuDeviceGetCount``, ``cuDeviceGetName`` of the CUDA driver API) through
    ctypes, so the answer needs neither TensorRT nor cuda-python nor a GPU
    build of ONNX Runtime, and a CPU host without the driver simply has none.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    if driver.cuInit(0) != 0:
        return ()
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return ()
    names = []
    for ordinal in range(count.value):
        device = ctypes.c_int(0)
        name = ctypes.create_string_buffer(256)
        if driver.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            continue
        if driver.cuDeviceGetName(name, len(name), device) != 0:
            continue
        names.append(name.value.decode("utf-8", "replace"))
    return tuple(names)
