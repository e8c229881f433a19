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

Also here, how a job ends when it is told to stop (docs/design.md §9, "Outcomes"):

- SIGTERM (SLURM, Kubernetes and systemd stop jobs with it, then SIGKILL after a grace period) is handled
  as Ctrl-C is: `stop_on_sigterm` raises `Terminated`, a KeyboardInterrupt, where the job runs, so the
  checkpoint on disk stays the resume point and the run (and a sweep's parent) is marked KILLED before the
  process exits; the process then ends by SIGTERM itself, so the shell sees 143 = 128 + 15.
- A parallel launcher's worker (joblib) must not outlive its launcher: `end_with_parent` watches for the
  launcher's death and stops the worker the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

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


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a job ran: handled wherever Ctrl-C is (the run ends KILLED)."""


_terminated = threading.Event()


def _raise_terminated(signum: int, frame) -> None:
    if _terminated.is_set():
        return  # a second SIGTERM while the first unwinds: the run is being closed already
    _terminated.set()
    raise Terminated(f"stopped by signal {signum} (SIGTERM)")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` in it (main thread only: Python delivers signals
    there, and signal.signal fails elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@atexit.register  # registered when the CLI starts, so it runs after the handlers registered later
def _exit_as_terminated() -> None:
    """After a handled SIGTERM, end by that signal (the exit status a shell and a scheduler expect: 143),
    instead of the status the CLI gives a KeyboardInterrupt."""
    if not _terminated.is_set():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def spawn_workers(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn(fn, args, nprocs), passing a SIGTERM of this process on to the workers
    (each ends its part of the job as on Ctrl-C, rank 0 marking the run KILLED) and waiting for them, so
    that none is left training alone. Ctrl-C reaches the workers itself (same process group)."""
    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    try:
        while not context.join():
            pass
    except Terminated:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in context.processes:
            process.join(timeout=120)
        raise


_watching = threading.Event()


def end_with_parent(parent_pid: int, grace: float = 10.0, interval: float = 0.5) -> None:
    """Stop this process when `parent_pid` stops being its parent (the launcher died, even by SIGKILL,
    and the kernel reparented this worker): SIGTERM to itself, so a running job ends its run KILLED as on
    Ctrl-C, then exit after `grace` seconds whatever it is doing (an idle worker dies at once by SIGTERM).

    A polling daemon thread rather than prctl(PR_SET_PDEATHSIG): the death signal fires when the *thread*
    that created the worker ends, and loky creates its workers from a manager thread, not from the
    launcher's main thread. Started once per process.
    """
    if _watching.is_set():
        return
    _watching.set()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="medexp-end-with-parent", daemon=True).start()
