"""'Same'-padded convolution through the FFT, by overlap-save tiles.

`fft_conv(x, weight, bias)` equals `F.conv3d(x, weight, bias, padding=k // 2)` (or `F.conv2d`): the
stride-1 cross-correlation out[n] = sum_m x[n + m - k // 2] w[m] with zero padding, computed by the
convolution theorem as

    out = irfftn( sum over input channels of rfftn(x) * conj(rfftn(w)) )

(the conjugate turns convolution into cross-correlation; Mathieu et al., "Fast training of convolutional
networks through FFTs", ICLR 2014). Per layer the cost is real FFTs of the input and output volumes plus
cin * cout complex products per frequency, which do not grow with the kernel size, against cin * cout * k^d
products per voxel for the direct convolution: for 7^3 kernels it wins at most levels of the network.

- Overlap-save (Oppenheim & Schafer, Discrete-Time Signal Processing, sec. 8.7): the zero-padded volume is
  cut into tiles of P voxels per axis overlapping by k - 1, each tile giving P - k + 1 valid outputs. An
  axis that fits one FFT of length >= n + k // 2 is a single tile (its zero padding absorbs the circular
  wrap-around). Small tiles keep the per-frequency weights small and give the channel product a batch of
  tiles. `plan_tiles` picks P by a cost model fitted on CPU; other devices time a few sizes instead
  (medexp.nn.fast.backend).
- The channel product is a function (medexp.nn.fast.product): with a stored kernel spectrum, or for Gabor
  layers with the spectrum built inside it.
- Hand-written backwards where autograd's generic ones are slow: rfftn's (a c2r transform instead of a
  full-size c2c) and the tiling's (overlap-add as 2^d strided adds).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from medexp.nn.fast.direct import format_of
from medexp.nn.fast.product import Product, stored_product
from medexp.nn.fast.spectrum import kernel_spectrum


def _is_smooth(n: int) -> bool:
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


GOOD_SIZES = tuple(n for n in range(4, 1025, 2) if _is_smooth(n))  # even, 7-smooth FFT lengths

# CPU costs (ns) of the tile-size model, fitted (least squares on relative error) to forward + backward
# times of (shape, tile) pairs on a 2-core CPU: per FFT point, channel and log2 of the FFT size; per FFT
# point and channel for the copies around it; per real entry of the kernel spectrum read by one of the
# three per-frequency GEMMs (forward, grad-input, grad-weight); per multiply-add of those GEMMs. Reading the
# kernel spectrum dominates with one tile and batch 1 (a GEMV per frequency), so smaller tiles that give
# the GEMMs rows usually win. Only the ranking of tile sizes depends on them, and only on CPU.
_COST_FFT, _COST_FFT_COPY, _COST_SPECTRUM_READ, _COST_GEMM = 0.053, 6.3, 0.90, 0.0195
# A product that builds the spectrum itself (the C kernels' fused product), per complex entry of the
# spectrum and per entry and tile, forward + backward, on the same scale.
_COST_FUSED, _COST_FUSED_TILE = 3.0, 1.0


def good_size(n: int) -> int:
    """The smallest even 7-smooth FFT length >= n."""
    return next((s for s in GOOD_SIZES if s >= n), 2 * ((n + 1) // 2))


def _tile_range(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, int]:
    """(smallest, largest) useful FFT size: the overlap k - 1 must fit in a tile's valid part; beyond one
    tile per axis larger sizes only add zeros."""
    largest = max(good_size(n + k // 2) for n, k in zip(spatial, kernel, strict=True))
    return max(2 * (max(kernel) - 1), 4), largest


def tile_candidates(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> list[int]:
    """A few FFT sizes worth timing where no cost model applies (non-CPU devices): one tile per axis, and
    tiles of about 2 and 4 overlaps (k - 1) when they are smaller."""
    smallest, largest = _tile_range(spatial, kernel)
    sizes = {good_size(max(smallest, m * (max(kernel) - 1))) for m in (2, 4)}
    return sorted({s for s in sizes if s < largest} | {largest})


def plan_tiles(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    cin: int,
    cout: int,
    batch: int = 1,
    tile: int | None = None,
    fused_tiles: int = 0,
) -> tuple[tuple[int, int, int], ...]:
    """Per axis (fft size P, valid outputs per tile T, number of tiles), by the CPU cost model.

    Args:
        spatial: input sizes (D, H, W) or (H, W).
        kernel: odd kernel sizes per axis.
        cin, cout, batch: channel counts and batch size, weigh the FFT against the channel GEMM.
        tile: force this FFT size per axis (axes that fit a smaller single FFT still use it).
        fused_tiles: the channel product builds the kernel spectrum itself for up to this many tiles (x
            batch), see medexp.nn.fast.product.
    """
    smallest, largest = _tile_range(spatial, kernel)
    candidates = [tile] if tile else [p for p in GOOD_SIZES if smallest <= p <= largest] or [largest]
    best, best_cost = None, math.inf
    for size in candidates:
        axes = tuple(_axis_plan(n, k, size) for n, k in zip(spatial, kernel, strict=True))
        points = math.prod(p * t for p, _, t in axes)  # FFT points per channel and batch item
        freqs = math.prod(p for p, _, _ in axes[:-1]) * (axes[-1][0] // 2 + 1)
        tiles = batch * math.prod(t for _, _, t in axes)
        log_size = math.log2(math.prod(p for p, _, _ in axes))
        cost = (_COST_FFT * log_size + _COST_FFT_COPY) * points * batch * (cin + cout)
        if tiles <= fused_tiles:
            cost += freqs * cin * cout * (_COST_FUSED + tiles * _COST_FUSED_TILE)
        else:
            cost += 3 * freqs * 4 * cin * cout * (_COST_SPECTRUM_READ + tiles * _COST_GEMM)
        if cost < best_cost:
            best, best_cost = axes, cost
    return best


def _axis_plan(n: int, k: int, size: int) -> tuple[int, int, int]:
    single = good_size(n + k // 2)
    if single <= size:
        return single, n, 1
    valid = size - (k - 1)
    return size, valid, -(-n // valid)


def _tiles(x: Tensor, axes, halves) -> Tensor:
    """Overlapping tiles of the zero-padded input: (B, cin, *S) -> (nt_0.., B, cin, P_0..)."""
    d = len(axes)
    t = x.permute(*range(2, 2 + d), 0, 1)  # (*S, B, cin)
    pad = []
    for n, h, (size, valid, count) in zip(t.shape[:d], halves, axes, strict=True):
        length = (count - 1) * valid + size  # to the end of the last tile
        pad = [h, length - n - h, *pad]
    return _Tiles.apply(F.pad(t, [0, 0, 0, 0, *pad]), axes)  # from (*L, B, cin)


class _Tiles(torch.autograd.Function):
    """Overlap-save tiles as one strided copy, tile axes last (MKL's real FFT runs faster over trailing
    axes than over leading ones); backward overlap-adds the tile gradients (`_overlap_add`)."""

    @staticmethod
    def forward(ctx, padded: Tensor, axes) -> Tensor:
        ctx.axes = axes
        d = len(axes)
        steps = padded.stride()[:d]
        size = [c for _, _, c in axes] + list(padded.shape[d:]) + [p for p, _, _ in axes]
        stride = [*[v * s for (_, v, _), s in zip(axes, steps, strict=True)], *padded.stride()[d:], *steps]
        return padded.as_strided(size, stride).contiguous()  # (nt_0.., B, cin, P_0..)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _overlap_add(grad, ctx.axes), None


def _overlap_add(grad: Tensor, axes) -> Tensor:
    """The tiles' gradient (nt_0.., B, cin, P_0..) summed back onto the padded input (*L, B, cin).

    Along an axis tile t covers t v .. t v + P - 1 (v valid outputs per tile): its first v entries do not
    overlap any other tile's first v, nor its last P - v (< v) entries any other tile's last P - v. So for
    each choice of part (first v, or last P - v) per axis the tiles' parts are one strided view of the
    result without self-overlap, and the whole backward is 2^d in-place adds (a single tile: one part). The
    adds read the tile axes contiguously and write channels-innermost, the layout of the padded input.
    """
    d = len(axes)
    lengths = [(count - 1) * valid + size for size, valid, count in axes]  # as `_tiles` pads
    out = grad.new_zeros(*lengths, *grad.shape[d : d + 2])  # (*L, B, cin)
    steps, channel_strides = out.stride()[:d], list(out.stride()[d:])
    parts = [[(0, p)] if count == 1 else [(0, valid), (valid, p - valid)] for p, valid, count in axes]
    for choice in itertools.product(*parts):  # (start, length) in the tile per axis
        offset = sum(start * step for (start, _), step in zip(choice, steps, strict=True))
        size, stride = [], []
        for (_, length), (_, valid, count), step in zip(choice, axes, steps, strict=True):
            size += [count, length]
            stride += [valid * step, step]
        target = out.as_strided(size + list(out.shape[d:]), stride + channel_strides, offset)
        source = grad[(..., *[slice(start, start + length) for start, length in choice])]
        order = [i for j in range(d) for i in (j, d + 2 + j)] + [d, d + 1]  # (nt_0, P_0, .., B, cin)
        target.add_(source.permute(*order))
    return out


def _untile(y: Tensor, axes, spatial) -> Tensor:
    """Valid part of every tile, reassembled: (P_0.., nt_0.., B, cout) -> (B, cout, *S)."""
    d = len(axes)
    for j, (_, valid, _) in enumerate(axes):
        y = y.narrow(j, 0, valid)  # (T_0.., nt_0.., B, cout)
    order = [i for j in range(d) for i in (d + j, j)]
    y = y.permute(*order, 2 * d, 2 * d + 1)  # (nt_0, T_0, nt_1, T_1, .., B, cout)
    y = y.reshape(*(v * c for _, v, c in axes), *y.shape[-2:])  # (nt_0 T_0, .., B, cout)
    for j, n in enumerate(spatial):
        y = y.narrow(j, 0, n)
    return y.permute(d, d + 1, *range(d))  # (B, cout, *S)


class _RealFFT(torch.autograd.Function):
    """rfftn over the trailing d dims, (rest.., P_0..) -> (P_0.., nx, rest..) with the frequencies leading
    (what the per-frequency GEMM reads), and a c2r backward (torch's own backward runs a full-size c2c).

    For X = rfftn(x) and a loss gradient g w.r.t. X, dL/dx[n] = Re(sum over the half spectrum of
    g[f] e^{+2 pi i f.n / N}); an unnormalised irfftn counts every interior bin of the halved axis twice
    (as g and as its Hermitian mirror), so those bins are halved first.
    """

    @staticmethod
    def forward(ctx, x: Tensor, d: int) -> Tensor:
        ctx.sizes = tuple(x.shape[-d:])
        spectrum = torch.fft.rfftn(x, dim=tuple(range(-d, 0)))  # (rest.., P_0.., nx)
        return spectrum.movedim(tuple(range(-d, 0)), tuple(range(d))).contiguous()  # (P_0.., nx, rest..)

    @staticmethod
    def backward(ctx, grad: Tensor):
        d, n = len(ctx.sizes), ctx.sizes[-1]
        weight = torch.ones(n // 2 + 1, device=grad.device, dtype=grad.real.dtype)
        weight[1 : (n + 1) // 2] = 0.5  # interior bins; DC and (even n) Nyquist count once
        grad = (grad * weight.view(-1, *[1] * (grad.dim() - d))).movedim(tuple(range(d)), tuple(range(-d, 0)))
        return torch.fft.irfftn(grad, s=ctx.sizes, dim=tuple(range(-d, 0)), norm="forward"), None


def spectral_conv(
    x: Tensor,
    weight_shape: tuple[int, ...],
    product: Product,
    bias: Tensor | None = None,
    tile: int | None = None,
    fused_tiles: int = 0,
) -> Tensor:
    """'Same'-padded stride-1 convolution of x (B, cin, *S) by a kernel of `weight_shape` (cout, cin, *k)
    given by its channel product: `product(x_spectra, sizes)` returns, per frequency and tile, the complex
    sum over input channels of the input spectra (F, T, cin, 2) times the kernel spectrum for FFT sizes
    `sizes`, (F, T, cout, 2) (medexp.nn.fast.product). `tile`: the FFT size per axis (default by
    `plan_tiles`); `fused_tiles`: the product builds the spectrum itself for up to this many tiles (x
    batch), which the tile plan then costs as such. Returns (B, cout, *S) in x's memory format."""
    d = x.dim() - 2
    if d not in (2, 3) or len(weight_shape) != d + 2 or weight_shape[1] != x.shape[1]:
        raise ValueError(f"fft_conv: input {tuple(x.shape)} and weight {tuple(weight_shape)} do not match")
    if any(k % 2 == 0 for k in weight_shape[2:]):
        raise ValueError(f"fft_conv: kernel sizes must be odd, got weight {tuple(weight_shape)}")
    batch, cin, *spatial = x.shape
    cout, ks = weight_shape[0], tuple(weight_shape[2:])
    axes = plan_tiles(tuple(spatial), ks, cin, cout, batch, tile, fused_tiles)
    sizes = tuple(p for p, _, _ in axes)
    tiles = _tiles(x, axes, [k // 2 for k in ks])  # (nt_0.., B, cin, P_0..)
    x_spectrum = _RealFFT.apply(tiles, d)  # (P_0.., nx, nt_0.., B, cin)
    freqs, count = x_spectrum.shape[:d], math.prod(x_spectrum.shape[d:-1])
    x_spectrum = torch.view_as_real(x_spectrum).reshape(math.prod(freqs), count, cin, 2)  # (F, T B, cin, 2)
    out = product(x_spectrum, sizes)  # (F, T B, cout, 2)
    out = out.reshape(*freqs, *tiles.shape[: d + 1], cout, 2)  # (P_0.., nx, nt_0.., B, cout, re/im)
    out = torch.fft.irfftn(
        torch.view_as_complex(out), s=sizes, dim=tuple(range(d))
    )  # (P_0.., nt_0.., B, cout)
    out = _untile(out, axes, spatial)  # (B, cout, *S)
    if bias is not None:
        out = out + bias.view(1, cout, *[1] * d)
    return out.contiguous(memory_format=format_of(x))


def fft_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, tile: int | None = None) -> Tensor:
    """'Same'-padded stride-1 convolution (cross-correlation, like F.conv{2,3}d) through the FFT.

    Args:
        x: (B, cin, *S) input, 2 or 3 spatial dims, any memory format.
        weight: (cout, cin, *k) kernel with odd sizes k.
        bias: optional (cout,) bias.
        tile: FFT size per axis; default chosen by `plan_tiles`.

    Returns:
        (B, cout, *S), equal to F.conv{d}d(x, weight, bias, padding=k // 2) up to float rounding, in the
        memory format of x.
    """
    product = stored_product(lambda sizes: kernel_spectrum(weight, sizes))
    return spectral_conv(x, tuple(weight.shape), product, bias, tile)
