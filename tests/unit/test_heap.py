"""A worker's freed image-sized buffers go back to the operating system (workers.heap)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child process: the threshold is process-wide, and the test needs a heap with this history only. It frees a 24 MiB
# block (which raises glibc's dynamic threshold to 24 MiB), then allocates 64 blocks of 2 MiB with a small block kept
# after each (so freed space cannot be trimmed from the heap's top) on a second thread, frees the large blocks and
# prints how much of the 128 MiB the process still holds.
_CHILD = """
import ctypes, sys, threading
from workers.heap import return_large_buffers_to_the_os
if sys.argv[1] == "fixed":
    assert return_large_buffers_to_the_os()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)

def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

def work():
    big = libc.malloc(24 << 20); ctypes.memset(big, 1, 24 << 20); libc.free(big)
    blocks, keep = [], []
    for _ in range(64):
        block = libc.malloc(2 << 20); ctypes.memset(block, 1, 2 << 20); blocks.append(block)
        keep.append(libc.malloc(64))
    before = rss_kib()
    for block in blocks:
        libc.free(block)
    print((before - rss_kib()) // 1024)

thread = threading.Thread(target=work); thread.start(); thread.join()
"""


def _released_mib(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_image_sized_buffers_are_returned_with_the_threshold_fixed_and_kept_without_it() -> None:
    assert _released_mib("fixed") >= 120, "every 2 MiB block was its own mapping, unmapped on free"
    assert _released_mib("dynamic") < 64, "without it the heap keeps them: what the fixed threshold is for"


def test_an_operators_own_threshold_is_left_in_force() -> None:
    from workers.heap import return_large_buffers_to_the_os

    assert not return_large_buffers_to_the_os(environ={"MALLOC_MMAP_THRESHOLD_": "4194304"})
