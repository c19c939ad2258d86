"""Large buffers go back to the operating system when freed: a worker's peak memory is its work's, not its history's.

glibc's ``malloc`` serves a request above its mmap threshold with a mapping
of its own, unmapped on ``free``. The threshold starts at 128 KiB but rises
to the size of any mapped block freed (up to 32 MiB on 64-bit), so after the
first decoded image, frame-sized arrays (an 800x600 float32 map is 1.9 MB; a
3000x2400 mammogram's 29 MB) come from the heaps instead, where freed space
is kept for reuse and fragments. Threads allocate from heaps of their own
(arenas, up to eight per core), so a study analysed on several threads
(``image_concurrency``) kept each thread's leftovers: ``breastai analyze``
of a two-view 3000x2400 mammogram study peaked at 1.46-1.59 GiB on two
threads against 1.33-1.35 GiB on one, with the same work. A fixed threshold
(``mallopt(M_MMAP_THRESHOLD)``, which also stops it moving) keeps buffers of
1 MiB and more in their own mappings: the same study then peaked at
1.10-1.22 GiB on one thread or two, and ultrasound analysis ran as fast
(2026-12-07, the project's 2-core machine; ``bench/README.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

#: Blocks of this size and larger are mapped on their own and unmapped when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def return_large_buffers_to_the_os(
    threshold_bytes: int = MMAP_THRESHOLD_BYTES, environ: Mapping[str, str] = os.environ
) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes`` for this process (``mallopt``, glibc only).

    An operator's own ``MALLOC_MMAP_THRESHOLD_`` (glibc's environment tunable) is left in force. With another
    allocator preloaded (jemalloc, tcmalloc), glibc's ``mallopt`` still answers yes and changes nothing.

    Returns
    -------
    bool
        Whether it was set: False where the environment sets it already, or the C library has no ``mallopt``
        (musl has no such threshold); either is said in the log.
    """
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        log.info("mmap_threshold_not_set", reason="MALLOC_MMAP_THRESHOLD_ is set in the environment")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("mmap_threshold_not_set", reason=f"no mallopt in the C library ({name})")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold_bytes) != 1:
        log.info("mmap_threshold_not_set", reason="mallopt refused it", threshold_bytes=threshold_bytes)
        return False
    return True
