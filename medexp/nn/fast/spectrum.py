"""Kernel spectra for the FFT convolution: conj(rfftn(w zero-padded to the FFT sizes)), as real pairs.

Why: the FFT convolution (medexp.nn.fast.fftconv) multiplies input spectra by the kernel's spectrum at
every frequency. A full FFT of a k^d kernel zero-padded to P^d points wastes most of its work on zeros, so:

- `kernel_spectrum` (any weight): a pruned DFT, the k taps transformed axis by axis with (P x k) DFT
  matrices (one GEMM per axis), cheaper than the FFT of the padded kernel when k << P.
- `gabor_spectrum` (Gabor weights, C kernels, csrc/spectrum_impl.h): straight from the separable factors
  of eq. 2 (medexp.nn.fast.generate), with no taps at all: the DFT of a product of 1D factors is the
  product of their 1D DFTs, and with Re z = (z + conj z) / 2 the spectrum of one pair is four rank-1 terms
  in the 1D transforms. Elsewhere (CUDA, no compiler) the pruned DFT of the generated weight.

Layout (what the per-frequency channel product reads, medexp.nn.fast.product): (2, F, cin, cout), real and
imaginary parts, F = P_0 ... P_{d-2} (P_{d-1} // 2 + 1) frequencies in rfftn's row-major order.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from medexp.nn.fast import native
from medexp.nn.fast.generate import c_params, dims, native_rows, native_rows_backward


@lru_cache(maxsize=256)
def _dft_cos_sin(
    k: int, size: int, rows: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi f m / size for frequencies f < rows and taps m < k: two (rows, k) matrices
    (angles in float64, so float32 tables are exact to rounding)."""
    f, m = torch.arange(rows, dtype=torch.float64), torch.arange(k, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(f, m) / size  # (rows, k)
    return torch.cos(angle).to(device, dtype), torch.sin(angle).to(device, dtype)


@lru_cache(maxsize=256)
def _dft_block(k: int, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2 size, 2 k) real block [[C, -S], [S, C]]: [re; im] of k taps -> [re; im] of their conj. DFT."""
    c, s = _dft_cos_sin(k, size, size, device, dtype)
    return torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 0)


def kernel_spectrum(weight: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """conj(rfftn(w zero-padded to `sizes`)) by a pruned DFT over the taps.

    Args:
        weight: (cout, cin, k_0, ..., k_{d-1}) kernel, taps at positions 0..k-1 of each axis.
        sizes: FFT size per axis.

    Returns:
        (2, F, cin, cout): real and imaginary parts per frequency (rfftn's row-major order).
    """
    cout, cin, *ks = weight.shape
    d = len(ks)
    dev, dt = weight.device, weight.dtype
    w = weight.permute(*range(2, 2 + d), 1, 0).reshape(*ks, cin * cout)  # (k_0, ..., k_{d-1}, pairs)
    c, s = _dft_cos_sin(ks[-1], sizes[-1], sizes[-1] // 2 + 1, dev, dt)  # (nx, k_{d-1}), the halved axis
    spec = torch.stack([torch.matmul(c, w), torch.matmul(s, w)], d - 2)  # (k_0.., 2, k_{d-2}, nx, pairs)
    for j in reversed(range(d - 1)):
        lead, rest = spec.shape[:j], spec.shape[j + 2 :]  # spec: (*lead, 2, k_j, *rest)
        spec = torch.matmul(_dft_block(ks[j], sizes[j], dev, dt), spec.reshape(*lead, 2 * ks[j], -1))
        spec = spec.reshape(*lead, 2, sizes[j], *rest)  # (*lead, re/im, P_j, *rest)
        if j > 0:
            spec = spec.movedim(j, j - 1)  # (k_0.., re/im, k_{j-1}, P_j, *rest) for the next axis
    return spec.reshape(2, -1, cin, cout)  # (re/im, F, cin, cout), a view


class _NativeSpectrum(torch.autograd.Function):
    """`kernel_spectrum(gabor weight, sizes)` by the C kernels (csrc/spectrum_impl.h): parameters -> q, e
    -> the conjugate spectrum of the zero-padded kernels, and back."""

    @staticmethod
    def forward(ctx, k: int, sizes: tuple[int, ...], *params: Tensor) -> Tensor:
        d = dims(params)
        flat = c_params(params)
        q, e = native_rows(flat, d)
        (cout, cin), pairs = flat[0].shape, flat[0].numel()
        freqs = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
        out = flat[0].new_empty(2, freqs, cin, cout)
        pointers = [native.pointer(t) for t in (q, e, out)]
        args = (*pointers, *native.longs(pairs, cin, cout), d, k, native.c_sizes(sizes))
        spectrum = native.function("gabor_spectrum", q.dtype)
        native.run_chunked(spectrum, cin * -(-cout // native.BLOCK), native.BLOCK, *args)
        ctx.save_for_backward(*flat, q, e)
        ctx.k, ctx.d, ctx.sizes = k, d, sizes
        return out  # (re/im, F, cin, cout)

    @staticmethod
    def backward(ctx, grad: Tensor):
        *flat, q, e = ctx.saved_tensors
        d, k = ctx.d, ctx.k
        (cout, cin), pairs = flat[0].shape, flat[0].numel()
        grad = grad.to(q.dtype).contiguous()  # (re/im, F, cin, cout), in the C kernels' type
        dq = torch.empty_like(q)
        pointers = [native.pointer(t) for t in (q, e, grad, dq)]
        args = (*pointers, *native.longs(pairs, cin, cout), d, k, native.c_sizes(ctx.sizes))
        backward = native.function("gabor_spectrum_backward", q.dtype)
        native.run_chunked(backward, cin * -(-cout // native.BLOCK), native.BLOCK, *args)
        return None, None, *native_rows_backward(flat, dq, d)


def check_sizes(sizes: tuple[int, ...], d: int) -> None:
    if len(sizes) != d or min(sizes) < 4 or any(n % 2 for n in sizes):
        raise ValueError(f"FFT sizes must be even lengths >= 4, one per axis, got {sizes}")


def native_spectrum(params: tuple[Tensor, ...], k: int, sizes: tuple[int, ...]) -> Tensor:
    """The spectrum `kernel_spectrum(W, sizes)` of the Gabor weight W of eq. 2 (k taps per axis;
    parameters in `gabor_kernel3d`'s order) by the C kernels, (2, F, cin, cout); differentiable in every
    parameter. Callers check `native.available` first."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"Gabor kernel size must be a positive odd integer, got {k}")
    check_sizes(tuple(sizes), dims(params))
    return _NativeSpectrum.apply(k, tuple(sizes), *params)
