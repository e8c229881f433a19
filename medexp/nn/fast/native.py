"""Build, load and call medexp's C kernels (medexp/nn/fast/csrc) with the system C compiler.

The C sources are plain C (no Python or PyTorch headers), so a build takes about a second: the first use
compiles them with `$CC` (default `cc`) into ~/.cache/medexp/native/<key>/ (or $MEDEXP_CACHE_DIR/native),
where the key hashes the sources, the flags, the compiler and the CPU model, so a cluster whose nodes share
a home directory keeps one build per CPU type. Builds are written under a temporary name and renamed, so
concurrent ranks never load a half-written library.

Without a working compiler (or with MEDEXP_NATIVE=0) `library()` returns None after one warning,
`available()` is False and the callers use PyTorch operations: the same results, only slower. With
MEDEXP_REQUIRE_NATIVE=1 (CI sets it) a missing compiler, a failed build or MEDEXP_NATIVE=0 raise
medexp.errors.ConfigError instead, so that the C kernels' tests cannot skip and pass without them.

Functions are called through ctypes, which releases the GIL during the call, so `run_chunked` runs one
range of the work per torch thread in parallel. `SIGNATURES` declares every C function's argument and
return types (ctypes' argtypes / restype), and `function` checks the argument count, so a call that does
not match its C prototype (a Python float or a tensor of the other float type where a pointer to this
type's floats is expected, an argument missing or too many) raises ctypes.ArgumentError / TypeError
instead of handing C garbage.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from medexp.errors import ConfigError

SOURCES = Path(__file__).resolve().parent / "csrc"
# -fopenmp-simd honours the `#pragma omp simd` loops without linking an OpenMP runtime (torch has its own).
SHARED = ["-shared", "-fPIC"]
NO_SINCOS = [f"-fno-builtin-{f}" for f in ("sin", "cos", "sinf", "cosf")]  # see csrc/separable.c
# The first set that compiles wins: vector math from glibc's libmvec (-DSEP_MVEC -lmvec), then without it
# (other C libraries), then without -march=native (other compilers).
FLAG_SETS = (  # (compiler flags, libraries: after the source, for linkers that drop unused ones)
    (["-O3", "-march=native", "-fopenmp-simd", *SHARED, "-DSEP_MVEC", *NO_SINCOS], ["-lmvec", "-lm"]),
    (["-O3", "-march=native", "-fopenmp-simd", *SHARED], ["-lm"]),
    (["-O3", "-fopenmp-simd", *SHARED], ["-lm"]),
)
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}  # the C functions' name suffix per dtype
C_REAL = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}  # REAL of that instance

# The C functions' prototypes (csrc/*.h), for both instances (_f32, _f64): {name: (argument types, return
# type)}. REAL stands for a pointer to the instance's floating type (float* / double*), SIZES for a C
# array of longs (`c_sizes`); ctypes converts Python ints to C long / int where declared so, and rejects
# anything else.
REAL, SIZES = "REAL*", ctypes.POINTER(ctypes.c_long)
_L, _I = ctypes.c_long, ctypes.c_int
SIGNATURES: dict[str, tuple[tuple, type]] = {
    "gabor_rows": ((*[REAL] * 10, _L, _I, _L, _L), _I),
    "gabor_rows_backward": ((*[REAL] * 17, _L, _I, _L, _L), _I),
    "gabor_expand": ((REAL, REAL, REAL, _L, _L, _I, _I, _I, _L, _L), _I),
    "gabor_expand_backward": ((REAL, REAL, REAL, REAL, _L, _L, _I, _I, _I, _L, _L), _I),
    "gabor_conv_backward": ((*[REAL] * 5, _L, _L, _L, _I, _I, SIZES, _L, _L, _L), _I),
    "gabor_spectrum": ((REAL, REAL, REAL, _L, _L, _L, _I, _I, SIZES, _L, _L), _I),
    "gabor_spectrum_backward": ((*[REAL] * 4, _L, _L, _L, _I, _I, SIZES, _L, _L), _I),
    "spectral_table_length": ((_I, SIZES), _L),
    "spectral_tables": ((REAL, REAL, REAL, _L, _L, _L, _I, _I, SIZES, _L, _L), _I),
    "spectral_forward": ((REAL, REAL, REAL, _L, _L, _L, _I, SIZES, _L, _L), _I),
    "spectral_backward_input": ((REAL, REAL, REAL, _L, _L, _L, _I, SIZES, _L, _L), _I),
    "spectral_backward_kernel": ((*[REAL] * 5, _L, _L, _L, _L, _I, _I, SIZES, _L, _L), _I),
}
BLOCK = 16  # BW of csrc/separable.c: channel pairs per block (one AVX-512 register of floats)
MIN_PER_THREAD = 2048  # pairs; with fewer per thread one call on this thread (a wake-up costs more)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("MEDEXP_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "medexp") / "native"


def _build(name: str, compiler: str) -> Path | None:
    """Compile csrc/<name>.c (with the headers beside it) into a cached shared library; None on failure."""
    source = SOURCES / f"{name}.c"
    texts = b"".join(p.read_bytes() for p in sorted(SOURCES.iterdir()) if p.suffix in (".c", ".h"))
    errors = []
    for flags, libs in FLAG_SETS:
        key = hashlib.sha256(
            texts + " ".join([compiler, *flags, *libs, _cpu_model(), platform.machine()]).encode()
        ).hexdigest()[:16]
        target = cache_dir() / key / f"lib{name}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, f"-I{SOURCES}", str(source), "-o", tmp, *libs]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    reason = errors[-1][0]
    _fall_back(f"could not compile {source} with {compiler} ({reason})", stacklevel=4)
    return None


def _fall_back(problem: str, stacklevel: int = 3) -> None:
    """Warn that the PyTorch operations replace the C kernels, or raise with MEDEXP_REQUIRE_NATIVE=1."""
    if os.environ.get("MEDEXP_REQUIRE_NATIVE", "0") == "1":
        raise ConfigError(f"MEDEXP_REQUIRE_NATIVE=1 but medexp's C kernels are unavailable: {problem}")
    warnings.warn(f"medexp: {problem}; using PyTorch", stacklevel=stacklevel)


@cache
def library(name: str = "separable") -> ctypes.CDLL | None:
    """The loaded C library csrc/<name>.c, or None (MEDEXP_NATIVE=0, or no working C compiler; with
    MEDEXP_REQUIRE_NATIVE=1 those raise ConfigError)."""
    if os.environ.get("MEDEXP_NATIVE", "1") == "0":
        if os.environ.get("MEDEXP_REQUIRE_NATIVE", "0") == "1":
            raise ConfigError("MEDEXP_REQUIRE_NATIVE=1 contradicts MEDEXP_NATIVE=0; unset one of them")
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        _fall_back(f"no C compiler {compiler!r} on PATH (set CC)")
        return None
    try:
        path = _build(name, compiler)
        return declare(ctypes.CDLL(str(path))) if path else None
    except OSError as err:  # unwritable cache directory, a library the loader rejects
        _fall_back(f"could not build or load csrc/{name}.c ({err})")
        return None


def available(t: Tensor) -> bool:
    """Whether the C kernels run for tensors like t: on CPU, in float32 or float64, outside torch.compile
    (Dynamo cannot trace ctypes calls), and where the library built. Never on CUDA."""
    return (
        t.device.type == "cpu"
        and t.dtype in SUFFIX
        and not torch.compiler.is_compiling()
        and library() is not None
    )


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """lib with argtypes and restype set on both instances of every function in SIGNATURES."""
    for name, (args, result) in SIGNATURES.items():
        for dtype, suffix in SUFFIX.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [ctypes.POINTER(C_REAL[dtype]) if a is REAL else a for a in args]
            fn.restype = result
    return lib


class CFunction:
    """A declared C function that also rejects extra arguments (ctypes passes any beyond argtypes on)."""

    def __init__(self, fn) -> None:
        self.fn, self.__name__, self.arity = fn, fn.__name__, len(fn.argtypes)

    def __call__(self, *args):
        if len(args) != self.arity:
            raise TypeError(f"{self.__name__} takes {self.arity} arguments ({len(args)} given)")
        return self.fn(*args)


def function(name: str, dtype: torch.dtype) -> CFunction:
    """The C function `name` for `dtype`, e.g. gabor_expand_f32, as declared in SIGNATURES."""
    if name not in SIGNATURES:
        raise KeyError(f"medexp: C function {name!r} has no entry in native.SIGNATURES")
    return CFunction(getattr(library(), f"{name}_{SUFFIX[dtype]}"))


def pointer(t: Tensor):
    """A pointer to t's first element typed by t's dtype (float* or double*): a C function of the other
    instance rejects it."""
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(C_REAL[t.dtype]))


def longs(*values: int) -> list[ctypes.c_long]:
    """C longs (the declared functions also take plain ints)."""
    return [ctypes.c_long(v) for v in values]


def c_sizes(sizes: tuple[int, ...]):
    """A C array of longs, e.g. the FFT size per axis."""
    return (ctypes.c_long * len(sizes))(*sizes)


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has the pool object but not its threads


os.register_at_fork(after_in_child=_forget_pool)


def run_chunked(fn, units: int, per_unit: int, *args) -> None:
    """fn(*args, u0, u1) over units [0, units) (pairs, or blocks of `per_unit` pairs), one range per torch
    thread (ctypes drops the GIL); fn returns nonzero when it could not allocate its work arrays."""
    global _POOL
    threads = max(1, min(torch.get_num_threads(), units * per_unit // MIN_PER_THREAD))
    bounds = [units * i // threads for i in range(threads + 1)]
    ranges = zip(bounds, bounds[1:], strict=False)
    calls = [(*args, ctypes.c_long(u0), ctypes.c_long(u1)) for u0, u1 in ranges]
    if threads == 1:
        failed = fn(*calls[0])
    else:
        if _POOL is None or _POOL._max_workers < threads:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medexp-native")
        futures = [_POOL.submit(fn, *call) for call in calls[1:]]
        failed = fn(*calls[0])  # the first range on this thread, meanwhile
        failed |= any([future.result() for future in futures])
    if failed:
        raise MemoryError(f"medexp: {fn.__name__} could not allocate its work arrays")
