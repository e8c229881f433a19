"""Kernel spectra for the FFT convolution: conj(rfftn(w zero-padded to the FFT sizes)), as real pairs.

Why: the FFT convolution (medexp.nn.fast.fftconv) multiplies input spectra by the kernel's spectrum at
every frequency. A full FFT of a k^d kernel zero-padded to P^d points wastes most of its work on zeros, so:

- `kernel_spectrum` (any weight): a pruned DFT, the k taps transformed axis by axis with (P x k) DFT
  matrices (one GEMM per axis), cheaper than the FFT of the padded kernel when k << P.
- `native_spectrum` (weights given by separable factors, medexp.nn.fast.generate; C kernels,
  csrc/spectrum_impl.h): straight from the factors, with no taps at all: the DFT of a product of 1D factors
  is the product of their 1D DFTs, and with Re z = (z + conj z) / 2 the spectrum of one pair is four rank-1
  terms in the 1D transforms. Elsewhere (CUDA, no compiler) the pruned DFT of the generated weight.

Layout (what the per-frequency channel product reads, medexp.nn.fast.product): (2, F, cin, cout), real and
imaginary parts, F = P_0 ... P_{d-2} (P_{d-1} // 2 + 1) frequencies in rfftn's row-major order.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from medexp.nn.fast import native
from medexp.nn.fast.generate import check_factors


@lru_cache(maxsize=256)
def _dft_cos_sin(
    k: int, size: int, rows: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi f m / size for frequencies f < rows and taps m < k: two (rows, k) matrices
    (arguments in float64, so float32 tables are exact to rounding)."""
    f, m = torch.arange(rows, dtype=torch.float64), torch.arange(k, dtype=torch.float64)
    arg = 2 * math.pi * torch.outer(f, m) / size  # (rows, k)
    return torch.cos(arg).to(device, dtype), torch.sin(arg).to(device, dtype)


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
    """`kernel_spectrum(native_weight(factors), sizes)` by the C kernels (csrc/spectrum_impl.h): factors ->
    the conjugate spectrum of the zero-padded kernels, and its gradient -> the factors'."""

    @staticmethod
    def forward(ctx, sizes: tuple[int, ...], factors: Tensor) -> Tensor:
        factors = factors.contiguous()  # a no-op for gabor_factors' result
        d, k, cout, cin = check_factors(factors)
        freqs = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
        out = factors.new_empty(2, freqs, cin, cout)
        pointers = (native.pointer(factors), native.pointer(out))
        args = (*pointers, cout * cin, cin, cout, d, k, native.c_sizes(sizes))
        spectrum = native.function("separable_spectrum", factors.dtype)
        native.run_chunked(spectrum, cin * -(-cout // native.BLOCK), native.BLOCK, *args)
        ctx.save_for_backward(factors)
        ctx.sizes = sizes
        return out  # (re/im, F, cin, cout)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (factors,) = ctx.saved_tensors
        d, k, cout, cin = check_factors(factors)
        grad = grad.to(factors.dtype).contiguous()  # (re/im, F, cin, cout), in the C kernels' type
        dfac = torch.empty_like(factors)
        pointers = [native.pointer(t) for t in (factors, grad, dfac)]
        args = (*pointers, cout * cin, cin, cout, d, k, native.c_sizes(ctx.sizes))
        backward = native.function("separable_spectrum_backward", factors.dtype)
        native.run_chunked(backward, cin * -(-cout // native.BLOCK), native.BLOCK, *args)
        return None, dfac


def check_sizes(sizes: tuple[int, ...], d: int) -> None:
    if len(sizes) != d or min(sizes) < 4 or any(n % 2 for n in sizes):
        raise ValueError(f"FFT sizes must be even lengths >= 4, one per axis, got {sizes}")


def native_spectrum(factors: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """The spectrum `kernel_spectrum(W, sizes)` of the weight W given by separable factors (d, k, 2, 2,
    cout, cin) (medexp.nn.fast.generate) by the C kernels, (2, F, cin, cout); differentiable in the factors.
    Callers check `native.available` first."""
    check_sizes(tuple(sizes), check_factors(factors)[0])
    return _NativeSpectrum.apply(tuple(sizes), factors)
