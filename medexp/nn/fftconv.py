"""'Same'-padded convolutions for large kernels: FFT, im2col-GEMM, direct, and a measured choice.

`fft_conv(x, weight, bias)` equals `F.conv3d(x, weight, bias, padding=k // 2)` (or `F.conv2d` in 2D): the
stride-1 cross-correlation out[n] = sum_m x[n + m - k // 2] w[m] with zero padding, computed as

    out = irfftn( sum over input channels of rfftn(x) * conj(rfftn(w)) )

(the convolution theorem; the conjugate turns convolution into cross-correlation, as in Mathieu et al.,
"Fast training of convolutional networks through FFTs", ICLR 2014). Per layer the cost is real FFTs of the
input and output volumes plus cin * cout complex products per frequency, which do not grow with the kernel
size, against cin * cout * k^d products per voxel for the direct convolution.

Implementation:
- Overlap-save (Oppenheim & Schafer, Discrete-Time Signal Processing, sec. 8.7): the zero-padded volume is
  cut into tiles of P voxels per axis overlapping by k - 1, each tile giving P - k + 1 valid outputs. An axis
  that fits one FFT of length >= n + k // 2 is a single tile (its zero padding absorbs the circular
  wrap-around). Small tiles keep the per-frequency weights small and give the channel product a batch of
  tiles, so it is one batched GEMM.
- Complex products are real GEMMs per frequency, in one of two arrangements (see `_channel_product`), so
  autograd never meets complex matmuls (slow conjugate paths on CPU).
- The kernel spectrum is a pruned DFT: the k taps are transformed axis by axis with (P x k) DFT matrices,
  cheaper than an FFT of the zero-padded kernel when k << P. `spectral_conv` takes the channel product as a
  function instead (the Gabor layers build their spectrum from their parameters inside it,
  `medexp.nn.separable.gabor_spectral_product`).
- Autograd runs through torch.fft and the GEMMs, except hand-written backwards that avoid slow generic
  ones: rfftn's (a c2r transform instead of a full-size c2c), the tiling's (overlap-add) and the channel
  products' (gradients written in place).

`gemm_conv` (im2col + one GEMM) serves small volumes; `same_conv(..., impl)` dispatches between these and
F.conv{2,3}d (in the input's memory layout, or contiguous), and `choose_impl` ("auto") times them once per
shape and remembers the fastest.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


def _is_smooth(n: int) -> bool:
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


GOOD_SIZES = tuple(n for n in range(4, 1025, 2) if _is_smooth(n))  # even, 7-smooth FFT lengths

# CPU costs (ns) of the tile-size model, fitted (least squares on relative error) to forward + backward times
# of 32 (shape, tile) pairs measured on a 2-core AMD EPYC (README Performance): per FFT point, channel and
# log2 of the FFT size; per FFT point and channel for the copies around it; per real entry of the kernel
# spectrum read by one of the three per-frequency GEMMs (forward, grad-input, grad-weight); per multiply-add
# of those GEMMs. Reading the kernel spectrum dominates with one tile and batch 1 (a GEMV per frequency), so
# smaller tiles that give the GEMMs rows usually win. Only the ranking of tile sizes depends on them.
_COST_FFT, _COST_FFT_COPY, _COST_SPECTRUM_READ, _COST_GEMM = 0.053, 6.3, 0.90, 0.0195
# A product that builds the spectrum itself (the Gabor layers' `fused_tiles`), per complex entry of the
# spectrum and per entry and tile, forward + backward, on the same scale: fitted to that product at 48 -> 48
# channels (20^3 x 1 tile, 16^3 x 2 and x 4) against the stored one at 14^3 x 8 tiles, measured side by side.
_COST_FUSED, _COST_FUSED_TILE = 3.0, 1.0


def good_size(n: int) -> int:
    """The smallest even 7-smooth FFT length >= n."""
    return next((s for s in GOOD_SIZES if s >= n), 2 * ((n + 1) // 2))


def _format_of(x: Tensor) -> torch.memory_format:
    """channels-last when x is laid out channels-innermost (also for one channel), else contiguous."""
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return fmt if x.is_contiguous(memory_format=fmt) and x.stride(1) == 1 else torch.contiguous_format


def plan_tiles(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    cin: int,
    cout: int,
    batch: int = 1,
    tile: int | None = None,
    fused_tiles: int = 0,
) -> tuple[tuple[int, int, int], ...]:
    """Per axis (fft size P, valid outputs per tile T, number of tiles), by a simple cost model.

    Args:
        spatial: input sizes (D, H, W) or (H, W).
        kernel: odd kernel sizes per axis.
        cin, cout, batch: channel counts and batch size, weigh the FFT against the channel GEMM.
        tile: force this FFT size per axis (axes that fit a smaller single FFT still use it).
        fused_tiles: the channel product builds the kernel spectrum itself for up to this many tiles (x
            batch), see `spectral_conv`.
    """
    largest = max(good_size(n + k // 2) for n, k in zip(spatial, kernel, strict=True))
    smallest = max(2 * (max(kernel) - 1), 4)  # the overlap (k - 1) must fit in one tile's valid part
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


@lru_cache(maxsize=256)
def _dft_cos_sin(
    k: int, size: int, rows: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi f m / size for frequencies f < rows and taps m < k: two (rows, k) matrices."""
    angle = (
        2
        * math.pi
        * torch.outer(torch.arange(rows, dtype=torch.float64), torch.arange(k, dtype=torch.float64))
    )
    angle = angle / size
    return torch.cos(angle).to(device, dtype), torch.sin(angle).to(device, dtype)


@lru_cache(maxsize=256)
def _dft_block(k: int, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2 size, 2 k) real block [[C, -S], [S, C]]: [re; im] of k taps -> [re; im] of their conj. DFT."""
    c, s = _dft_cos_sin(k, size, size, device, dtype)
    return torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 0)


def kernel_spectrum(weight: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """conj(rfftn(w zero-padded to `sizes`)) as real (re, im) pairs, by a pruned DFT over the taps.

    Args:
        weight: (cout, cin, k_0, ..., k_{d-1}) kernel, taps at positions 0..k-1 of each axis.
        sizes: FFT size per axis.

    Returns:
        (2, F, cin, cout): real and imaginary parts, F = P_0 ... P_{d-2} (P_{d-1} // 2 + 1) frequencies
        (row-major, as rfftn).
    """
    cout, cin, *ks = weight.shape
    d = len(ks)
    dev, dt = weight.device, weight.dtype
    w = weight.permute(*range(2, 2 + d), 1, 0).reshape(*ks, cin * cout)  # (k_0, ..., k_{d-1}, pairs)
    c, s = _dft_cos_sin(ks[-1], sizes[-1], sizes[-1] // 2 + 1, dev, dt)  # (nx, k_{d-1})
    spec = torch.stack([torch.matmul(c, w), torch.matmul(s, w)], d - 2)  # (k_0.., 2, k_{d-2}, nx, pairs)
    for j in reversed(range(d - 1)):
        lead, rest = spec.shape[:j], spec.shape[j + 2 :]  # spec: (*lead, 2, k_j, *rest)
        spec = torch.matmul(_dft_block(ks[j], sizes[j], dev, dt), spec.reshape(*lead, 2 * ks[j], -1))
        spec = spec.reshape(*lead, 2, sizes[j], *rest)  # (*lead, re/im, P_j, *rest)
        if j > 0:
            spec = spec.movedim(j, j - 1)  # (k_0.., re/im, k_{j-1}, P_j, *rest) for the next axis
    return spec.reshape(2, -1, cin, cout)  # (re/im, F, cin, cout), a view


def _channel_product(x: Tensor, w: Tensor) -> Tensor:
    """Per frequency, the complex product of input spectra and kernel spectra summed over input channels.

    x: (F, T, cin, 2) as real (re, im) pairs and w: (2, F, cin, cout) real and imaginary parts; returns
    (F, T, cout, 2). Both forms are real batched GEMMs per frequency, so autograd never meets a complex
    matmul (slow conjugate paths on CPU); they differ in which side is rearranged:
    - rows [x_re; x_im] (F, 2T, cin) times w_re and times w_im (views), combined into x_re w_re - x_im w_im
      and x_re w_im + x_im w_re (`_RowsProduct`): copies of the input spectrum;
    - the interleaved input (F, T, 2 cin), a free view, times the block [[w_re, w_im], [-w_im, w_re]]
      (F, 2 cin, 2 cout): copies of four times the kernel spectrum.
    The cheaper one by copied volume (measured at levels 0-2 of the 64^3 network): rows when many channel
    pairs meet few tiles (deep levels), the block otherwise.
    """
    freqs, tiles, cin, _ = x.shape
    cout = w.shape[-1]
    if tiles * (cin + cout) < 2 * cin * cout:
        rows = x.permute(0, 3, 1, 2).reshape(freqs, 2 * tiles, cin)  # (F, [re; im] T, cin)
        return _RowsProduct.apply(rows, w)  # (F, T, cout, 2)
    return _BlockProduct.apply(x.reshape(freqs, tiles, 2 * cin), w).view(freqs, tiles, cout, 2)


class _BlockProduct(torch.autograd.Function):
    """x (F, T, 2 cin), (re, im) interleaved per input channel, and w = (w_re, w_im) (2, F, cin, cout) -> the
    complex product (F, T, 2 cout) as one GEMM per frequency with the real block [[w_re, w_im], [-w_im,
    w_re]] (F, 2 cin, 2 cout). The block is written in one buffer and its gradient folded straight into
    the kernel spectrum's (autograd's stacks cost three copies forward and a stack of the gradient halves
    backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        _, freqs, cin, cout = w.shape
        block = w.new_empty(freqs, cin, 2, cout, 2)  # (F, i, x re/im, o, out re/im)
        block[:, :, 0, :, 0], block[:, :, 0, :, 1], block[:, :, 1, :, 1] = w[0], w[1], w[0]
        torch.neg(w[1], out=block[:, :, 1, :, 0])
        block = block.view(freqs, 2 * cin, 2 * cout)
        ctx.save_for_backward(x, block)
        return torch.bmm(x, block)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, block = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, block.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            freqs, cin2, cout2 = block.shape
            g = torch.bmm(x.transpose(1, 2), grad).view(freqs, cin2 // 2, 2, cout2 // 2, 2)
            grad_w = g.new_empty(2, freqs, cin2 // 2, cout2 // 2)
            torch.add(g[:, :, 0, :, 0], g[:, :, 1, :, 1], out=grad_w[0])  # w_re at (re, re) and (im, im)
            torch.sub(g[:, :, 0, :, 1], g[:, :, 1, :, 0], out=grad_w[1])  # w_im at (re, im), -w_im (im, re)
        return grad_x, grad_w


class _RowsProduct(torch.autograd.Function):
    """rows = [x_re; x_im] (F, 2T, cin) and w = (w_re, w_im) (2, F, cin, cout) -> the complex product
    (F, T, cout, 2) = (x_re w_re - x_im w_im, x_re w_im + x_im w_re), from a = rows w_re and b = rows w_im.
    Written out so that the backward writes the kernel spectrum's gradient halves in place (autograd's
    unbind backward stacks them, a copy as large as the spectrum) and each half of the product's gradient
    once (autograd's slice backwards zero-fill whole tensors and add)."""

    @staticmethod
    def forward(ctx, rows: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(rows, w)
        a, b = torch.bmm(rows, w[0]), torch.bmm(rows, w[1])  # (F, 2T, cout) each
        tiles = rows.shape[1] // 2
        return torch.stack([a[:, :tiles] - b[:, tiles:], b[:, :tiles] + a[:, tiles:]], -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        rows, w = ctx.saved_tensors
        g_re, g_im = grad[..., 0], grad[..., 1]  # (F, T, cout) each
        tiles = grad.shape[1]
        grad_a = grad.new_empty(grad.shape[0], 2 * tiles, grad.shape[2])  # dL/da = [g_re; g_im]
        grad_b = torch.empty_like(grad_a)  # dL/db = [g_im; -g_re]
        grad_a[:, :tiles], grad_a[:, tiles:] = g_re, g_im
        grad_b[:, :tiles] = g_im
        torch.neg(g_re, out=grad_b[:, tiles:])
        grad_rows = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.bmm(grad_a, w[0].transpose(1, 2)).baddbmm_(grad_b, w[1].transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            torch.bmm(rows.transpose(1, 2), grad_a, out=grad_w[0])
            torch.bmm(rows.transpose(1, 2), grad_b, out=grad_w[1])
        return grad_rows, grad_w


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
    """Overlap-save tiles as one strided copy, tile axes last (the FFT runs over trailing axes, measured
    2x faster than over leading ones for this forward transform); backward overlap-adds the tile gradients
    (`_overlap_add`)."""

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
    product = spectrum_product(lambda sizes: kernel_spectrum(weight, sizes))
    return spectral_conv(x, tuple(weight.shape), product, bias, tile)


# (input spectra (F, T, cin, 2), FFT sizes) -> (F, T, cout, 2), see `spectral_conv`
Product = Callable[[Tensor, tuple[int, ...]], Tensor]


def spectrum_product(spectrum: Callable[[tuple[int, ...]], Tensor]) -> Product:
    """The channel product with a stored kernel spectrum: `spectrum(sizes)` returns what
    `kernel_spectrum(weight, sizes)` would, (2, F, cin, cout)."""
    return lambda x_spectra, sizes: _channel_product(x_spectra, spectrum(sizes))


def spectral_conv(
    x: Tensor,
    weight_shape: tuple[int, ...],
    product: Product,
    bias: Tensor | None = None,
    tile: int | None = None,
    fused_tiles: int = 0,
) -> Tensor:
    """`fft_conv` with the kernel given by its channel product: `product(x_spectra, sizes)` returns, per
    frequency and tile, the complex sum over input channels of the input spectra x_spectra (F, T, cin, 2)
    times the spectrum of the (cout, cin, *k) kernel of `weight_shape` for FFT sizes `sizes`, (F, T, cout, 2)
    (`spectrum_product` from a stored spectrum; the Gabor layers build theirs from their parameters,
    `medexp.nn.separable.gabor_spectral_product`). `fused_tiles`: the product builds the spectrum itself
    for up to this many tiles (x batch), which the tile plan then costs as such."""
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
    out = product(x_spectrum, sizes)  # (F, tiles B, cout, 2)
    out = out.reshape(*freqs, *tiles.shape[: d + 1], cout, 2)  # (P_0.., nx, nt_0.., B, cout, re/im)
    out = torch.fft.irfftn(
        torch.view_as_complex(out), s=sizes, dim=tuple(range(d))
    )  # (P_0.., nt_0.., B, cout)
    out = _untile(out, axes, spatial)  # (B, cout, *S)
    if bias is not None:
        out = out + bias.view(1, cout, *[1] * d)
    return out.contiguous(memory_format=_format_of(x))


# --- the other implementations and the choice between them -------------------------------------------

IMPLS = ("auto", "direct", "direct_contiguous", "fft", "gemm")
MARGIN = 0.9  # "auto" leaves "direct" only for an implementation at least 10% faster: noise cannot hurt
GEMM_MAX_COLUMNS = 2**24  # "gemm" is only tried while its im2col matrix has at most this many entries
_AUTO_CHOICE: dict[tuple, str] = {}  # auto_key(...) -> impl


def direct_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.conv{2,3}d with 'same' padding k // 2; the kernel takes x's memory format (oneDNN is fastest when
    input and weight are both channels-last, and then returns channels-last), by the same rule as the
    weights GaborConv generates for it (`weight_channels_last`)."""
    if weight_channels_last(x, "direct"):
        weight = channels_last_weight(weight)
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    return conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]])


def direct_contiguous_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.conv{2,3}d run in the contiguous layout, returned in x's: on CPU oneDNN's channels-last kernels
    for 7^3 taps are up to 2x slower than its contiguous ones where the volume is small and the weight
    large (the deepest levels of the network, README Performance), and there the activations are small,
    so converting them costs little."""
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    out = conv(x.contiguous(), weight.contiguous(), bias, padding=[k // 2 for k in weight.shape[2:]])
    return out.contiguous(memory_format=_format_of(x))


def channels_last_weight(weight: Tensor) -> Tensor:
    """weight (cout, cin, *k) with channels-last strides (cin innermost), copied only if it has not; also
    for cin = 1, where .contiguous(memory_format=...) keeps the old strides."""
    if weight.stride(1) == 1:
        return weight
    d = weight.dim() - 2
    return weight.permute(0, *range(2, 2 + d), 1).contiguous().permute(0, 1 + d, *range(1, 1 + d))


def weight_channels_last(x: Tensor, impl: str) -> bool:
    """Whether implementation `impl` (not "auto") wants a channels-last weight for input x: direct
    follows x's layout (a one-channel input is both; with a channels-last weight oneDNN runs its
    channels-last kernel, measured faster: 1->12 at 64^3 91 vs 111 ms), direct_contiguous does not, gemm
    reads channels-last weights as a view and fft copies the weight whatever its layout."""
    if impl == "direct_contiguous":
        return False
    return impl != "direct" or _format_of(x) != torch.contiguous_format or x.shape[1] == 1


def gemm_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """'Same' convolution as im2col + one GEMM (Chellapilla et al., 2006), in x's memory format.

    For volumes not much larger than the kernel (7^3 taps on 4^3 voxels) one (cout, cin k^d) x (cin k^d,
    voxels) GEMM beats oneDNN's direct kernel, which is built for large spatial sizes.
    """
    d = x.dim() - 2
    batch, cin, *spatial = x.shape
    ks = weight.shape[2:]
    cols = F.pad(x, [h for k in reversed(ks) for h in (k // 2, k // 2)])
    for j, k in enumerate(ks):
        cols = cols.unfold(2 + j, k, 1)  # (B, cin, *S, k_0, ..)
    taps = tuple(range(2 + d, 2 + 2 * d))
    # a channels-last weight is (cout, *k, cin) in memory: order the columns (*k, cin) and use it as a view
    if weight.stride(1) == 1 and cin > 1:
        cols = cols.permute(0, *taps, 1, *range(2, 2 + d))  # (B, *k, cin, *S)
        matrix = weight.permute(0, *range(2, 2 + d), 1).reshape(weight.shape[0], -1)  # (cout, k^d cin)
    else:
        cols = cols.permute(0, 1, *taps, *range(2, 2 + d))  # (B, cin, *k, *S)
        matrix = weight.reshape(weight.shape[0], -1)  # (cout, cin k^d)
    cols = cols.reshape(batch, cin * math.prod(ks), math.prod(spatial))  # (B, cin k^d, voxels)
    out = torch.matmul(matrix, cols)  # (B, cout, voxels)
    out = out.view(batch, -1, *spatial)  # (B, cout, *S)
    if bias is not None:
        out = out + bias.view(1, -1, *[1] * d)
    return out.contiguous(memory_format=_format_of(x))


_CONVS = {
    "direct": direct_conv,
    "direct_contiguous": direct_contiguous_conv,
    "fft": fft_conv,
    "gemm": gemm_conv,
}


def same_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, impl: str = "auto") -> Tensor:
    """'Same'-padded stride-1 convolution by `impl`: "direct" (F.conv{2,3}d in x's memory layout),
    "direct_contiguous" (F.conv{2,3}d in the contiguous layout), "fft" (`fft_conv`), "gemm" (`gemm_conv`) or
    "auto" (the fastest for this shape, see `choose_impl`). All equal F.conv{2,3}d(x, weight, bias,
    padding=k // 2) up to float rounding."""
    weight = crop_to_reach(weight, tuple(x.shape[2:]))
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _CONVS[resolve_impl(x, tuple(weight.shape), grad, impl)](x, weight, bias)


def resolve_impl(
    x: Tensor, weight_shape: tuple[int, ...], grad: bool, impl: str, layer: MeasuredLayer | None = None
) -> str:
    """The implementation `impl` stands for when x meets a weight of `weight_shape` (backward too when
    `grad`): itself, or for "auto" the measured fastest (of `layer`'s own paths if given)."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return choose_impl(x, weight_shape, grad, layer) if impl == "auto" else impl


def reach(kernel_size: int, size: int) -> int:
    """How many central taps of a 'same' kernel of odd size k can meet an axis of n voxels: min(k, 2n - 1).

    Output voxel p reads input p + m for offsets |m| <= k // 2; with 0 <= p, p + m < n only |m| <= n - 1
    can land inside the volume, every other tap multiplies zero padding.
    """
    return min(kernel_size, 2 * size - 1)


def crop_to_reach(weight: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """The central taps of `weight` (cout, cin, *k) that can meet a volume of size `spatial` (see `reach`);
    the 'same' convolution with the cropped kernel is exactly the one with the full kernel. Deep levels of
    small inputs (7^3 kernels on 2^3 or 1^3 voxels) then cost 3^3 or 1 tap instead of 343."""
    ks = weight.shape[2:]
    keep = [reach(k, n) for k, n in zip(ks, spatial, strict=True)]
    if keep == list(ks):
        return weight
    central = (slice((k - c) // 2, (k + c) // 2) for k, c in zip(ks, keep, strict=True))
    return weight[(slice(None), slice(None), *central)]


class MeasuredLayer(Protocol):
    """A layer whose implementations "auto" times as the layer runs them (kernel generation included)."""

    def run_impl(self, impl: str, x: Tensor) -> Tensor: ...  # the convolution of x by impl (not "auto")

    def parameters(self) -> Iterator[Tensor]: ...


def auto_key(x: Tensor, weight_shape: tuple[int, ...], grad: bool, measured_by: str = "weight") -> tuple:
    """What the speed of a convolution depends on: shapes, dtype, device, memory format, grad mode, and
    what was timed ("weight": a given weight; else the layer class whose own paths were timed)."""
    shapes = (tuple(x.shape), tuple(weight_shape))
    return (*shapes, x.dtype, str(x.device), _format_of(x), bool(grad), measured_by)


def choose_impl(
    x: Tensor, weight_shape: tuple[int, ...], grad: bool, layer: MeasuredLayer | None = None
) -> str:
    """The fastest implementation for this (shape, channels, kernel, device, format, grad mode).
    `weight_shape` is the (cout, cin, *k) of the weight, `grad` whether backward runs too; with `layer`
    its own `run_impl` paths are timed (the Gabor layers: generation of the weight or of the kernel
    spectrum included), else the convolutions with a random weight.

    Timed once per key on random tensors of the same layout and remembered in a module-level dict: each
    candidate runs once untimed as warm-up (a first run pays for plans and for first touches of fresh
    memory, gigabytes for the FFT at 128^3), then once timed (forward, plus backward when grad is on);
    those within 2x of direct run once more and the best time wins, direct unless beaten by MARGIN.
    Kernels of <= 27 taps always run direct; direct_contiguous is tried for channels-last inputs, gemm only
    for small volumes. Every candidate is timed with its weight in the layout it asks for
    (`weight_channels_last`), as GaborConv generates it.
    """
    key = auto_key(x, weight_shape, grad, "weight" if layer is None else type(layer).__name__)
    if key not in _AUTO_CHOICE:
        cin, *taps = weight_shape[1:]
        if math.prod(taps) <= 27 or torch.compiler.is_compiling():
            return "direct"
        candidates = ["direct", "fft"]
        if _format_of(x) != torch.contiguous_format:
            candidates.append("direct_contiguous")
        if x.shape[0] * cin * math.prod(taps) * math.prod(x.shape[2:]) <= GEMM_MAX_COLUMNS:
            candidates.append("gemm")
        _AUTO_CHOICE[key] = _measure(x, weight_shape, grad, candidates, layer)
    return _AUTO_CHOICE[key]


def auto_choices() -> dict[tuple, str]:
    """A copy of the decisions "auto" made so far (for benchmarks and logs)."""
    return dict(_AUTO_CHOICE)


def _measure(
    x: Tensor, weight_shape: tuple[int, ...], grad: bool, candidates: list[str], layer: MeasuredLayer | None
) -> str:
    import time

    xs = torch.randn_like(x).requires_grad_(grad)  # same shape, dtype, device and strides
    if layer is not None:
        params = [p for p in layer.parameters() if p.requires_grad]
        runs = {name: (lambda name=name: layer.run_impl(name, xs), (xs, *params)) for name in candidates}
    else:
        weight = torch.randn(weight_shape, dtype=x.dtype, device=x.device)
        layouts = {False: weight, True: channels_last_weight(weight)}
        ws = {n: layouts[weight_channels_last(x, n)].detach().requires_grad_(grad) for n in candidates}
        runs = {name: (lambda name=name: _CONVS[name](xs, ws[name]), (xs, ws[name])) for name in candidates}
    sync = torch.cuda.synchronize if xs.is_cuda else (lambda: None)

    def run(name: str) -> float:
        sync()
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            forward, inputs = runs[name]
            out = forward()
            if grad:
                torch.autograd.grad(out, inputs, torch.ones_like(out))
        sync()
        return time.perf_counter() - start

    for name in candidates:  # warm-up: FFT plans, oneDNN primitives, first touch of large temporaries
        run(name)
    best = {name: run(name) for name in candidates}
    alive = [name for name in candidates if best[name] <= 2.0 * best["direct"]]
    for name in alive:
        best[name] = min(best[name], run(name))
    fastest = min(best, key=best.get)
    return fastest if best[fastest] < MARGIN * best["direct"] else "direct"
