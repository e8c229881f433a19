"""The Python-C boundary of medexp's C kernels (medexp.nn.fast.native): every C function is declared, a
call that does not match its prototype raises instead of corrupting memory, and MEDEXP_REQUIRE_NATIVE=1
(set by CI) turns a missing compiler or a failed build into an error instead of a fallback."""

from __future__ import annotations

import ctypes
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from medexp.errors import ConfigError
from medexp.nn.fast import native

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler")


def exported_functions() -> set[str]:
    """Names of the non-static functions the C sources define (`int FN(name)(`, `long FN(name)(`)."""
    text = "".join(p.read_text() for p in native.SOURCES.glob("*.h"))
    return set(re.findall(r"^(?:int|long) FN\((\w+)\)\(", text, flags=re.M))


def test_every_c_function_is_declared_and_every_declaration_exists():
    assert exported_functions() == set(native.SIGNATURES)


def _library_path() -> str:
    return native.library()._name


@needs_native
def test_the_return_type_is_declared_long():
    # spectral_table_length returns a C long: 4 numbers (2 terms, re/im) per frequency of each axis, times
    # 16 lanes. For sizes (2^27, 4, 4): (2^29 + 32) 16 = 8589935104 > 2^31.
    sizes = native.c_sizes((2**27, 4, 4))
    want = (4 * (2**27 + 4 + 4)) * 16
    assert native.function("spectral_table_length", torch.float32)(3, sizes) == want
    # CONTROL: the same symbol loaded without the declarations is read as a C int: a wrong number
    untyped = ctypes.CDLL(_library_path()).spectral_table_length_f32
    assert untyped(3, sizes) != want


@needs_native
def test_a_call_that_does_not_match_the_prototype_raises():
    table_length = native.function("spectral_table_length", torch.float64)
    with pytest.raises(ctypes.ArgumentError):
        table_length(3, 1.5)  # a Python float where the sizes pointer is expected
    with pytest.raises(ctypes.ArgumentError):
        table_length(3, 0)  # an int (a raw address) where the sizes pointer is expected
    with pytest.raises(TypeError, match="takes 2 arguments"):
        table_length(0)  # the sizes pointer missing
    with pytest.raises(TypeError, match="takes 2 arguments"):
        table_length(0, native.c_sizes((4,)), 7)  # one too many (ctypes alone passes it on)
    # CONTROL: the undeclared symbol takes the short call and returns (d = 0 never reads the pointer): the
    # missing argument goes unnoticed
    assert ctypes.CDLL(_library_path()).spectral_table_length_f64(0) == 0


@needs_native
def test_a_tensor_of_the_other_float_type_is_rejected():
    # A float64 buffer handed to the float32 instance would be read as twice as many floats: the typed
    # pointer (double*) does not convert to the float* the declaration asks for.
    doubles, floats = torch.zeros(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float32)
    expand = native.function("gabor_expand", torch.float32)
    args = (native.pointer(floats), native.pointer(floats), native.pointer(doubles), 1, 1, 3, 1, 0, 0, 0)
    with pytest.raises(ctypes.ArgumentError, match="argument 3"):
        expand(*args)
    with pytest.raises(KeyError, match="no entry in native.SIGNATURES"):
        native.function("gabor_undeclared", torch.float32)
    with pytest.raises(KeyError):
        native.pointer(torch.zeros(1, dtype=torch.int64))  # no C instance for integers


LAYER_RUN = """
import torch
from medexp.nn.gabor import GaborConv3d
torch.manual_seed(0)
layer, x = GaborConv3d(2, 3, 5, impl="direct"), torch.randn(1, 2, 6, 6, 6)
print(float((layer(x) - layer.reference(x)).abs().max()))
"""


def _run_layer(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """A Gabor layer's forward in a fresh interpreter, with a fresh build cache and the given variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEDEXP_")} | env
    environ["MEDEXP_CACHE_DIR"] = str(tmp_path / "cache")  # nothing built yet: the compiler is needed
    return subprocess.run(
        [sys.executable, "-c", LAYER_RUN], env=environ, capture_output=True, text=True, timeout=120
    )


def test_require_native_turns_a_missing_compiler_into_an_error(tmp_path):
    required = _run_layer(tmp_path, CC="/nonexistent", MEDEXP_REQUIRE_NATIVE="1")
    assert required.returncode != 0 and required.stdout == ""
    last = required.stderr.strip().splitlines()[-1]
    assert last == (
        "medexp.errors.ConfigError: MEDEXP_REQUIRE_NATIVE=1 but medexp's C kernels are unavailable: "
        "no C compiler '/nonexistent' on PATH (set CC)"
    )
    # CONTROL: without the switch the same run warns, falls back to PyTorch and gives the reference
    fallback = _run_layer(tmp_path, CC="/nonexistent")
    assert fallback.returncode == 0, fallback.stderr
    assert "no C compiler '/nonexistent' on PATH (set CC); using PyTorch" in fallback.stderr
    assert float(fallback.stdout) < 1e-5


def test_require_native_turns_a_failed_build_and_native_off_into_errors(tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("MEDEXP_CACHE_DIR", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        monkeypatch.setenv("MEDEXP_REQUIRE_NATIVE", "1")
        with pytest.raises(
            ConfigError, match=r"unavailable: could not compile .*broken-cc: cannot compile\)$"
        ):
            native.library()
        with pytest.raises(ConfigError, match="unavailable"):
            native.available(torch.zeros(1))  # every caller meets the error, none falls back
        monkeypatch.setenv("MEDEXP_NATIVE", "0")
        with pytest.raises(ConfigError, match="contradicts MEDEXP_NATIVE=0"):
            native.library()
        # CONTROL: the switch off, the same compiler only warns
        monkeypatch.delenv("MEDEXP_NATIVE")
        monkeypatch.setenv("MEDEXP_REQUIRE_NATIVE", "0")
        with pytest.warns(UserWarning, match="could not compile .*broken-cc: cannot compile"):
            assert native.library() is None
    finally:
        native.library.cache_clear()
