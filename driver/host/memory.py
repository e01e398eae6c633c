"""The C allocator's settings for the backup data path (docs/design.md, "Large buffers").

Each chunk a backup or restore moves passes through several multi-MiB buffers (the HTTP body,
the ciphertext, the compressed and the plain bytes). glibc serves allocations above its mmap
threshold with fresh mappings and unmaps them on free, so every page of every buffer is faulted
in and zeroed by the kernel again: a 2 GiB restore of incompressible data took 1.57 million
page faults and 6-8 s of system time. With the thresholds below, freed buffers stay in the heap
and are reused: about zero faults, 2.2-2.4 s of system time, 1.5x the restore throughput
(measured on this machine; compressible data did not show the storm and is unchanged).
The price: the process keeps up to its data path's peak (about 100 MiB more after a restore)
instead of returning it at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap (glibc's dynamic threshold would stop at 32 MiB).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of a heap is returned to the kernel only above this much.
TRIM_THRESHOLD = 64 << 20


def keep_large_buffers() -> bool:
    """Apply the thresholds (glibc only); False, with a log line, where they cannot be set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("the C library has no mallopt (not glibc): allocator thresholds left as they are")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok: bool = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("mallopt refused the allocator thresholds; large buffers are mapped afresh")
    return ok
