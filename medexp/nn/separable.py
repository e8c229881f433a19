"""Separable generation of Gabor kernels: from a few numbers per channel pair to its k^d taps (eq. 2).

medexp.nn.gabor writes every kernel of Wong & Moradi's eq. 2 as the real part of two rank-1 complex tensors
(terms t = cosine, sine), per channel pair (o, i):

    W[o, i, a, b, c] = sum_t Re(c_t phi_0[a, t] phi_1[b, t] phi_2[c, t]),
    phi_j[a, t] = exp(-s r_a^2) e^{i w_jt r_a}

with r_a = a - k // 2 the tap offsets, s = 1 / (2 sigma^2), w_jt = 2 pi u_j f_t (u the direction of x') and
c_t the complex amplitude of term t (2D drops the middle axis). `expand(q, k)` takes, per pair, the row

    q[o, i] = (s, w_00, w_01, ..., w_(d-1)0, w_(d-1)1, Re c_0, Im c_0, Re c_1, Im c_1)   (1 + 2 d + 4 numbers)

and returns W. This is where generation spends its time (k^d taps from 11 numbers, forward and backward), so
on CPU it runs the hand-written C kernel of csrc/separable_impl.h: one pass over the taps each way, 16 pairs
at a time in vector registers, ranges of pairs on `torch.get_num_threads()` threads, writing the weight in
the channels-last layout that oneDNN's convolution reads (and its weight gradient arrives in). Elsewhere
(CUDA, Dynamo tracing, no C compiler) it runs `expand_torch`, the same sum in PyTorch operations.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from medexp.nn import native

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
MIN_BLOCKS_PER_THREAD = 512  # fewer per thread: one call on this thread (a wake-up costs more)


def row_length(d: int) -> int:
    """Numbers per pair in q for d spatial dims: s, 2 frequencies per axis, 2 complex amplitudes."""
    return 1 + 2 * d + 4


def _dims(q: Tensor) -> int:
    d = (q.shape[-1] - 5) // 2
    if q.dim() != 3 or d not in (2, 3) or q.shape[-1] != row_length(d):
        raise ValueError(
            f"expand: q must be (cout, cin, 9) in 2D or (cout, cin, 11) in 3D, got {tuple(q.shape)}"
        )
    return d


def expand_torch(q: Tensor, k: int) -> Tensor:
    """W from q by PyTorch operations (reference, fallback): (cout, cin, 1 + 2d + 4) -> (cout, cin, k, ..)."""
    d = _dims(q)
    cout, cin = q.shape[:2]
    q = q.reshape(cout * cin, -1)  # (P, 1 + 2d + 4)
    pairs = q.shape[0]
    r = torch.arange(k, device=q.device, dtype=q.dtype) - k // 2  # (k,)
    envelope = torch.exp(-q[:, :1] * r * r)  # (P, k)
    omega = q[:, 1 : 1 + 2 * d].reshape(pairs, d, 1, 2)  # (P, d, 1, 2)
    phi = torch.polar(envelope[:, None, :, None].expand(-1, d, -1, 2), omega * r[:, None])  # (P, d, k, 2)
    amplitudes = q[:, 1 + 2 * d :].reshape(pairs, 2, 2)  # (P, term, re/im)
    c = torch.complex(amplitudes[..., 0], amplitudes[..., 1])  # (P, 2)
    trail = c[:, None, :] * phi[:, d - 1]  # (P, k, 2): c times the last axis
    for axis in reversed(range(1, d - 1)):
        trail = (phi[:, axis, :, None, :] * trail[:, None, :, :]).flatten(1, 2)  # (P, k^(d-axis), 2)
    # Re(first . trail) summed over both terms = [re, -im] of first . [re, im] of trail: a batched GEMM of
    # inner size 4, shaped (k x 4)(4 x k^(d-1)), which runs ~3x faster than (k^(d-1) x 4)(4 x k) (measured).
    first = torch.view_as_real(phi[:, 0].conj().resolve_conj()).reshape(pairs, k, 4)
    right = torch.view_as_real(trail).reshape(pairs, -1, 4).transpose(1, 2)  # (P, 4, k^(d-1))
    return torch.bmm(first, right).view(cout, cin, *[k] * d)  # (cout, cin, k, .., k)


BLOCK = 16  # BW of csrc/separable.c: pairs (consecutive input channels) per block
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has the pool object but not its threads


os.register_at_fork(after_in_child=_forget_pool)


def _run_chunked(fn, blocks: int, *args) -> None:
    """fn(*args, b0, b1) over blocks [0, blocks), one range per thread (ctypes drops the GIL); fn returns
    nonzero when it could not allocate its work arrays, raised here as MemoryError."""
    global _POOL
    threads = max(1, min(torch.get_num_threads(), blocks // MIN_BLOCKS_PER_THREAD))
    bounds = [blocks * i // threads for i in range(threads + 1)]
    ranges = zip(bounds, bounds[1:], strict=False)
    calls = [(*args, ctypes.c_long(b0), ctypes.c_long(b1)) for b0, b1 in ranges]
    if threads == 1:
        failed = fn(*calls[0])
    else:
        if _POOL is None or _POOL._max_workers < threads:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medexp-expand")
        futures = [_POOL.submit(fn, *call) for call in calls[1:]]
        failed = fn(*calls[0])  # the first range on this thread, meanwhile
        failed |= any([future.result() for future in futures])
    if failed:
        raise MemoryError(f"medexp: {fn.__name__} could not allocate its work arrays")


def _exponentials(q: Tensor, d: int) -> Tensor:
    """(..., 1 + 4d): exp(-s) and (cos w, sin w) of every frequency in q, the values the C kernel raises to
    powers (PyTorch's vectorised transcendental functions, so the kernel itself needs only products)."""
    head = q[..., : 1 + 2 * d].contiguous()  # s and the frequencies, contiguous: vectorised cos and sin
    omega = head[..., 1:]  # (..., 2d)
    return torch.cat([torch.exp(-head[..., :1]), torch.stack([omega.cos(), omega.sin()], -1).flatten(-2)], -1)


def _pointer(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class _NativeExpand(torch.autograd.Function):
    """`expand_torch` by the C kernel: forward writes the taps, backward reduces their gradient onto q."""

    @staticmethod
    def forward(ctx, q: Tensor, k: int) -> Tensor:
        lib, suffix, d = native.library(), _SUFFIX[q.dtype], _dims(q)
        cout, cin = q.shape[:2]
        q = q.contiguous()
        e = _exponentials(q, d)
        out = q.new_empty(cout, *[k] * d, cin)  # channels-last memory of the (cout, cin, k..k) weight
        blocks = cout * -(-cin // BLOCK)
        args = (_pointer(q), _pointer(e), _pointer(out), ctypes.c_long(cin), d, k)
        _run_chunked(getattr(lib, f"gabor_expand_{suffix}"), blocks, *args)
        ctx.save_for_backward(q, e)
        ctx.k = k
        return out.movedim(-1, 1)  # (cout, cin, k, .., k), channels-last strides

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, e = ctx.saved_tensors
        lib, suffix, d = native.library(), _SUFFIX[q.dtype], _dims(q)
        cout, cin = q.shape[:2]
        grad = grad.movedim(1, -1).contiguous()  # (cout, k.., cin): no copy when it is channels-last
        dq = torch.empty_like(q)
        blocks = cout * -(-cin // BLOCK)
        args = (_pointer(q), _pointer(e), _pointer(grad), _pointer(dq), ctypes.c_long(cin), d, ctx.k)
        _run_chunked(getattr(lib, f"gabor_expand_backward_{suffix}"), blocks, *args)
        return dq, None


def native_available(q: Tensor) -> bool:
    """Whether `expand` runs the C kernel for q."""
    return (
        q.device.type == "cpu"
        and q.dtype in _SUFFIX
        and not torch.compiler.is_compiling()
        and native.library() is not None
    )


def expand(q: Tensor, k: int) -> Tensor:
    """The (cout, cin, k, .., k) weight of eq. 2 from the (cout, cin, 1 + 2d + 4) rows q (module docstring).

    Differentiable in q; the C kernel on CPU (channels-last result), `expand_torch` otherwise (contiguous);
    the same values up to float rounding.
    """
    _dims(q)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"expand: kernel size must be a positive odd integer, got {k}")
    if native_available(q):
        return _NativeExpand.apply(q, k)
    return expand_torch(q, k)
