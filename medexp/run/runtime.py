"""Process-level CPU settings that make training faster; applied once, before torch is imported.

Two measured problems of PyTorch on a small CPU machine (scripts/bench.py prints the effect):

- glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
  returns it with munmap on free, so every large activation or gradient of every step page-faults its
  memory in again: writing a fresh 50 MB tensor took 12.8 ms, against 1.8 ms when the heap keeps freed
  blocks. `keep_freed_memory` raises the mmap threshold and the trim threshold with mallopt(3), the
  same effect as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables (or a
  caching allocator such as jemalloc) recommended for PyTorch on CPU. The process keeps its peak heap,
  as a GPU caching allocator does. Skipped where the C library has no mallopt (macOS, musl).
- OpenMP threads that spin while waiting lose their time slice to each other when other processes share
  the cores (measured 3x slower steps on a loaded 2-core machine): OMP_WAIT_POLICY=PASSIVE, read by
  libgomp when torch loads it. An explicit OMP_WAIT_POLICY in the environment wins.

MEDEXP_NO_TUNE=1 leaves the process untouched (for comparing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's <malloc.h>
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD = (1 << 31) - 1  # give memory back to the OS only above 2 GiB of free heap top


def keep_freed_memory() -> bool:
    """Ask glibc malloc to reuse freed large blocks instead of unmapping them; True if it accepted."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def configure() -> None:
    """Apply both settings unless MEDEXP_NO_TUNE=1. Call before importing torch."""
    if os.environ.get("MEDEXP_NO_TUNE") == "1":
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Child processes (DDP workers started with spawn, data loader workers) read the same setting from
    # the environment when their C library starts.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    keep_freed_memory()
