"""The FFT convolution's channel product: per frequency and tile, sum over input channels of X K.

By the convolution theorem the 'same' convolution becomes, per frequency f and tile n,

    Y[f, n, o] = sum_i X[f, n, i] K[f, i, o]        (complex; X input spectra, K = conj(rfftn(w)))

one small complex matrix product per frequency (medexp.nn.fast.fftconv does the transforms around it).
Complex products are written as real batched GEMMs, so autograd never meets a complex matmul (slow
conjugate paths on CPU), with hand-written backwards that write gradients in place instead of autograd's
stack/slice copies. Two ways to get K:

- stored (`stored_product`): K computed once per forward (medexp.nn.fast.spectrum) and read by the GEMMs;
  many tiles (x batch) share its cost. Two arrangements of the same GEMMs, the cheaper by copied volume
  (`scripts/bench.py`: each wins on its side of the rule): rows [x_re; x_im] against w_re and w_im as views
  (`_RowsProduct`, copies the input spectra: few tiles, many channel pairs) or the interleaved input
  against the real block [[w_re, w_im], [-w_im, w_re]] (`_BlockProduct`, copies 4x the kernel spectrum).
- fused (`fused_product`, C kernels, csrc/spectral_impl.h): with one tile the stored K (F cin cout complex
  numbers) is written, read, its gradient written and read again, and the product is memory-bound; here
  each block of K is built from the pairs' 1D transforms where the product uses it and never stored. It
  wins up to FUSED_MAX_TILES tiles (x batch), where K's cost is not shared (`scripts/bench.py --sections
  product`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from medexp.nn.fast import native
from medexp.nn.fast.generate import c_params, dims, native_rows, native_rows_backward
from medexp.nn.fast.spectrum import check_sizes

FUSED_MAX_TILES = 4  # tiles (x batch) up to which `fused_product` beats the stored spectrum

# (input spectra (F, T, cin, 2), FFT sizes) -> (F, T, cout, 2), see medexp.nn.fast.fftconv.spectral_conv
Product = Callable[[Tensor, tuple[int, ...]], Tensor]


def channel_product(x: Tensor, w: Tensor) -> Tensor:
    """x (F, T, cin, 2) as real (re, im) pairs times the kernel spectrum w (2, F, cin, cout) -> (F, T, cout,
    2), by the arrangement that copies less (see the module docstring)."""
    freqs, tiles, cin, _ = x.shape
    cout = w.shape[-1]
    if tiles * (cin + cout) < 2 * cin * cout:
        rows = x.permute(0, 3, 1, 2).reshape(freqs, 2 * tiles, cin)  # (F, [re; im] T, cin)
        return _RowsProduct.apply(rows, w)  # (F, T, cout, 2)
    interleaved = x.reshape(freqs, tiles, 2 * cin)  # (F, T, cin re/im): a free view
    return _BlockProduct.apply(interleaved, w).view(freqs, tiles, cout, 2)


class _BlockProduct(torch.autograd.Function):
    """x (F, T, 2 cin), (re, im) interleaved per input channel, and w = (w_re, w_im) (2, F, cin, cout) -> the
    complex product (F, T, 2 cout) as one GEMM per frequency with the real block [[w_re, w_im], [-w_im,
    w_re]] (F, 2 cin, 2 cout), written in one buffer; its gradient is folded straight into the kernel
    spectrum's."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        _, freqs, cin, cout = w.shape
        block = w.new_empty(freqs, cin, 2, cout, 2)  # (F, i, x re/im, o, out re/im)
        block[:, :, 0, :, 0], block[:, :, 0, :, 1], block[:, :, 1, :, 1] = w[0], w[1], w[0]
        torch.neg(w[1], out=block[:, :, 1, :, 0])
        block = block.view(freqs, 2 * cin, 2 * cout)
        ctx.save_for_backward(x, block)
        return torch.bmm(x, block)  # (F, T, 2 cout)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, block = ctx.saved_tensors
        grad, grad_x, grad_w = grad.to(block.dtype), None, None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, block.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            freqs, cin2, cout2 = block.shape
            g = torch.bmm(x.transpose(1, 2), grad).view(freqs, cin2 // 2, 2, cout2 // 2, 2)  # (F, i, ., o, .)
            grad_w = g.new_empty(2, freqs, cin2 // 2, cout2 // 2)
            torch.add(g[:, :, 0, :, 0], g[:, :, 1, :, 1], out=grad_w[0])  # w_re at (re, re) and (im, im)
            torch.sub(g[:, :, 0, :, 1], g[:, :, 1, :, 0], out=grad_w[1])  # w_im at (re, im), -w_im (im, re)
        return grad_x, grad_w


class _RowsProduct(torch.autograd.Function):
    """rows = [x_re; x_im] (F, 2T, cin) and w = (w_re, w_im) (2, F, cin, cout) -> the complex product
    (F, T, cout, 2) = (x_re w_re - x_im w_im, x_re w_im + x_im w_re), from a = rows w_re and b = rows w_im.
    The backward writes the spectrum's gradient halves in place and each half of the product's gradient
    once (autograd's unbind and slice backwards would stack and zero-fill whole tensors)."""

    @staticmethod
    def forward(ctx, rows: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(rows, w)
        a, b = torch.bmm(rows, w[0]), torch.bmm(rows, w[1])  # (F, 2T, cout) each
        tiles = rows.shape[1] // 2
        return torch.stack([a[:, :tiles] - b[:, tiles:], b[:, :tiles] + a[:, tiles:]], -1)  # (F, T, cout, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        rows, w = ctx.saved_tensors
        grad = grad.to(w.dtype)
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


def stored_product(spectrum: Callable[[tuple[int, ...]], Tensor]) -> Product:
    """The channel product with a stored kernel spectrum: `spectrum(sizes)` returns (2, F, cin, cout)."""
    return lambda x_spectra, sizes: channel_product(x_spectra, spectrum(sizes))


def _per_row(x: Tensor, cout: int, sizes: tuple[int, ...]) -> int:
    """The work of one f0 unit of the fused product, in `run_chunked`'s pair units (~64 products each)."""
    return max(1, x.shape[1] * x.shape[2] * cout * math.prod(sizes[1:-1]) * (sizes[-1] // 2 + 1) // 64)


class _FusedProduct(torch.autograd.Function):
    """`channel_product(x, native_spectrum(...))` without the spectrum (csrc/spectral_impl.h): each block
    of it is built from the pairs' 1D transforms where the product uses it, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, sizes: tuple[int, ...], *params: Tensor) -> Tensor:
        d = dims(params)
        flat = c_params(params)
        q, e = native_rows(flat, d)
        (cout, cin), pairs = flat[0].shape, flat[0].numel()
        freqs, tiles = x.shape[:2]
        blocks, c_sizes = cin * -(-cout // native.BLOCK), native.c_sizes(sizes)
        table_length = native.function("spectral_table_length", q.dtype)(d, c_sizes)
        tables = q.new_empty(blocks, table_length)  # the blocks' 1D transforms
        args = (*[native.pointer(t) for t in (q, e, tables)], *native.longs(pairs, cin, cout), d, k, c_sizes)
        native.run_chunked(native.function("spectral_tables", q.dtype), blocks, native.BLOCK, *args)
        x = x.contiguous()  # (F, T, cin, re/im)
        # plain tensors: x may be a MONAI MetaTensor, whose new_empty rejects a size given as ints
        out = torch.empty((freqs, tiles, cout, 2), dtype=x.dtype, device=x.device)
        args = (*[native.pointer(t) for t in (tables, x, out)], *native.longs(cin, cout, tiles), d, c_sizes)
        forward = native.function("spectral_forward", q.dtype)
        native.run_chunked(forward, sizes[0], _per_row(x, cout, sizes), *args)
        ctx.save_for_backward(x, tables, *flat, q, e)
        ctx.k, ctx.d, ctx.sizes = k, d, sizes
        return out  # (F, T, cout, re/im)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, tables, *flat, q, e = ctx.saved_tensors
        d, k, sizes = ctx.d, ctx.k, ctx.sizes
        grad = grad.to(q.dtype)  # the C kernels read q's type (a backward run under autocast may differ)
        (cout, cin), pairs = flat[0].shape, flat[0].numel()
        freqs, tiles = x.shape[:2]
        c_sizes = native.c_sizes(sizes)
        coutp = -(-cout // native.BLOCK) * native.BLOCK  # the C kernels read whole blocks
        padded = torch.zeros(
            (freqs, tiles, 2, coutp), dtype=grad.dtype, device=grad.device
        )  # (F, T, 2, coutp)
        padded[..., :cout] = grad.transpose(2, 3)  # (F, T, re/im, cout)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            pointers = [native.pointer(t) for t in (tables, padded, grad_x)]
            args = (*pointers, *native.longs(cin, cout, tiles), d, c_sizes)
            input_backward = native.function("spectral_backward_input", q.dtype)
            native.run_chunked(input_backward, sizes[0], _per_row(x, cout, sizes), *args)
        dq = torch.empty_like(q)
        pointers = [native.pointer(t) for t in (q, e, x, padded, dq)]
        args = (*pointers, *native.longs(pairs, cin, cout, tiles))
        kernel_backward = native.function("spectral_backward_kernel", q.dtype)
        per_block = max(1, native.BLOCK * freqs * tiles // 64)  # ~64 products per pair unit, like `_per_row`
        native.run_chunked(kernel_backward, cin * -(-cout // native.BLOCK), per_block, *args, d, k, c_sizes)
        return grad_x, None, None, *native_rows_backward(flat, dq, d)


def fused_product(x: Tensor, params: tuple[Tensor, ...], k: int, sizes: tuple[int, ...]) -> Tensor:
    """The channel product of input spectra x (F, T, cin, re/im) with the spectrum of the Gabor weight of
    eq. 2 (`gabor_kernel3d`'s parameter order, k taps per axis) for FFT sizes `sizes`, (F, T, cout, re/im),
    by the C kernels without storing the spectrum; differentiable in x and every parameter. Callers check
    `native.available` first."""
    sigma = params[0]
    shape_ok = x.dim() == 4 and tuple(x.shape[2:]) == (sigma.shape[1], 2)
    if not shape_ok or x.dtype != sigma.dtype or x.device != sigma.device:
        raise ValueError(
            f"fused_product: input spectra {tuple(x.shape)} {x.dtype} do not match parameters "
            f"{tuple(sigma.shape)} {sigma.dtype}; expected (F, T, cin, 2) of the same dtype and device"
        )
    check_sizes(tuple(sizes), dims(params))
    return _FusedProduct.apply(x, k, tuple(sizes), *params)
