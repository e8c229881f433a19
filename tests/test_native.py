"""The Python-C boundary of medexp's C kernels (medexp.nn.fast.native): every C function is declared, a
call that does not match its prototype raises instead of corrupting memory."""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

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
