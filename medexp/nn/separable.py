"""Separable generation of Gabor kernels: from eq. 2's parameters per channel pair to its k^d taps (or to
the kernel spectrum).

medexp.nn.gabor writes every kernel of Wong & Moradi's eq. 2 as the real part of two rank-1 complex tensors
(terms t = cosine, sine), per channel pair (o, i):

    W[o, i, a, b, c] = sum_t Re(c_t phi_0[a, t] phi_1[b, t] phi_2[c, t]),
    phi_j[a, t] = exp(-s r_a^2) e^{i w_jt r_a}

with r_a = a - k // 2 the tap offsets, s = 1 / (2 sigma^2), w_jt = 2 pi u_j f_t (u the direction of x') and
c_t the complex amplitude of term t (2D drops the middle axis). `rows_torch` computes, per pair, the row

    q[o, i] = (s, w_00, w_01, ..., w_(d-1)0, w_(d-1)1, Re c_0, Im c_0, Re c_1, Im c_1)   (1 + 2 d + 4 numbers)

from the parameters and `expand_torch` multiplies it out; `gabor_weight` is the two together. Generation is
k^d taps from 8 numbers per pair, forward and backward, for up to 37k pairs per layer, and as ~80 small
PyTorch operations it cost more than the convolution it feeds on small volumes; so on CPU `gabor_weight`
runs the hand-written C kernels of csrc/ instead (rows_impl.h: the parameters to q, vectorised over pairs;
separable_impl.h: q to the taps, 16 pairs at a time in vector registers, one pass over the taps each way,
ranges of pairs on `torch.get_num_threads()` threads), writing the weight in the memory layout the
convolution runs in (channels-last, or contiguous for `direct_contiguous`, see medexp.nn.fftconv), which
is also the layout its weight gradient arrives in. Elsewhere (CUDA, Dynamo tracing, no C compiler) it runs
the PyTorch operations.

For FFT convolutions `gabor_spectrum` gives the kernel spectrum that medexp.nn.fftconv.kernel_spectrum
would compute from the taps, straight from q (csrc/spectrum_impl.h: four rank-1 terms in the 1D transforms
of the factors per pair), forward and backward; elsewhere through the taps. `gabor_spectral_product` is the
FFT convolution's channel product with that spectrum, each block of it built where the product uses it and
never stored (csrc/spectral_impl.h; C kernels only). `gabor_conv` is the direct convolution with the weight
whose parameters' gradient is formed from the input and the output gradient block by block, never as dL/dW
(csrc/separable_impl.h gabor_conv_backward; C kernels only, on small volumes: `fused_gradient_pays`).
"""

from __future__ import annotations

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from medexp.nn import native
from medexp.nn.fftconv import direct_contiguous_conv, direct_conv, kernel_spectrum, weight_channels_last

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def row_length(d: int) -> int:
    """Numbers per pair in q for d spatial dims: s, 2 frequencies per axis, 2 complex amplitudes."""
    return 1 + 2 * d + 4


def _dims(q: Tensor) -> int:
    d = (q.shape[-1] - 5) // 2
    if q.dim() != 3 or d not in (2, 3) or q.shape[-1] != row_length(d):
        raise ValueError(
            f"expand_torch: q must be (cout, cin, 9) in 2D or (cout, cin, 11) in 3D, got {tuple(q.shape)}"
        )
    return d


def direction(angles: tuple[Tensor, ...]) -> Tensor:
    """The unit direction u of x' along the weight's spatial axes, (cout, cin, d) (DESIGN 5):
    3D (theta_y, theta_z): x' = sin(ty) z - cos(ty) sin(tz) y + cos(ty) cos(tz) x, axes (D, H, W);
    2D (theta,): x' = x cos(theta) + y sin(theta), axes (H, W)."""
    if len(angles) == 2:
        theta_y, theta_z = angles
        cos_y = torch.cos(theta_y)
        return torch.stack([torch.sin(theta_y), -cos_y * torch.sin(theta_z), cos_y * torch.cos(theta_z)], -1)
    (theta,) = angles
    return torch.stack([torch.sin(theta), torch.cos(theta)], -1)


def rows_torch(sigma, angles: tuple[Tensor, ...], a_re, a_im, f_re, f_im, psi) -> Tensor:
    """q (cout, cin, 1 + 2d + 4) from eq. 2's (cout, cin) parameters (sigma > 0; angles as `direction`)."""
    s = 1 / (2 * sigma**2)  # g(r) = exp(-s r^2)
    frequencies = torch.stack([f_re, f_im], -1)[..., None, :]  # (cout, cin, 1, 2)
    omega = 2 * math.pi * direction(angles)[..., None] * frequencies  # (cout, cin, d, 2)
    cos_psi, sin_psi = torch.cos(psi), torch.sin(psi)
    # c_0 = a_re e^{i psi} (cosine term), c_1 = -i a_im e^{i psi} (sine term), as (re, im) pairs
    coef = torch.stack([a_re * cos_psi, a_re * sin_psi, a_im * sin_psi, -a_im * cos_psi], -1)  # (.., 4)
    return torch.cat([s[..., None], omega.flatten(-2), coef], -1)


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
LAYOUT_CONTIGUOUS, LAYOUT_STREAM = 1, 2  # gabor_expand's layout flags (csrc/separable.c)
DEFAULT_CACHE_BYTES = 32 << 20  # when sysfs does not say
FUSED_GRAD_MAX_PER_TAP = {2: 48, 3: 512}  # per spatial dims, see `fused_gradient_pays`
MIN_PER_THREAD = 2048  # pairs; fewer per thread: one call on this thread (a wake-up costs more)
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has the pool object but not its threads


os.register_at_fork(after_in_child=_forget_pool)


def _run_chunked(fn, units: int, per_unit: int, *args) -> None:
    """fn(*args, u0, u1) over units [0, units) (pairs, or blocks of `per_unit` pairs), one range per thread
    (ctypes drops the GIL); fn returns nonzero when it could not allocate its work arrays (MemoryError)."""
    global _POOL
    threads = max(1, min(torch.get_num_threads(), units * per_unit // MIN_PER_THREAD))
    bounds = [units * i // threads for i in range(threads + 1)]
    ranges = zip(bounds, bounds[1:], strict=False)
    calls = [(*args, ctypes.c_long(u0), ctypes.c_long(u1)) for u0, u1 in ranges]
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


def largest_cache_bytes(cache_dir: Path) -> int:
    """The largest cache listed under a sysfs cpu cache folder (index*/size, e.g. "32768K"); 0 if none."""
    sizes = [0]
    for index in cache_dir.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


@cache
def last_level_cache_bytes() -> int:
    """cpu0's last-level cache (Linux sysfs); DEFAULT_CACHE_BYTES where the system does not say."""
    return largest_cache_bytes(Path("/sys/devices/system/cpu/cpu0/cache")) or DEFAULT_CACHE_BYTES


def _pointer(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _longs(*values: int) -> list[ctypes.c_long]:
    """C longs (ctypes passes bare Python ints as int)."""
    return [ctypes.c_long(v) for v in values]


def _native_rows(params: list[Tensor], d: int) -> tuple[Tensor, Tensor]:
    """q and e (csrc/rows_impl.h) from the (cout, cin) parameters, by the C kernel."""
    lib, suffix = native.library(), _SUFFIX[params[0].dtype]
    pairs = params[0].numel()
    q = params[0].new_empty(row_length(d), pairs)  # one row per number, see csrc/rows_impl.h
    e = params[0].new_empty(1 + 4 * d, pairs)  # exp(-s), cos and sin of every frequency
    pointers = [_pointer(t) for t in params]
    rows = getattr(lib, f"gabor_rows_{suffix}")
    _run_chunked(rows, pairs, 1, *pointers, _pointer(q), _pointer(e), ctypes.c_long(pairs), d)
    return q, e


def _native_rows_backward(params: list[Tensor], dq: Tensor, d: int) -> list[Tensor]:
    """The parameters' gradients from dL/dq, by the C kernel: [sigma, theta_y, theta_z, a_re, .., psi]."""
    lib, suffix = native.library(), _SUFFIX[dq.dtype]
    grads = [torch.empty_like(t) for t in params]
    pointers = [_pointer(t) for t in params] + [_pointer(dq)] + [_pointer(t) for t in grads]
    pairs = dq.shape[1]
    rows_backward = getattr(lib, f"gabor_rows_backward_{suffix}")
    _run_chunked(rows_backward, pairs, 1, *pointers, ctypes.c_long(pairs), d)
    return grads


def _contiguous_params(sigma, theta_y, theta_z, amplitudes) -> tuple[list[Tensor], int]:
    """The 8 parameter tensors as the C kernels read them (2D repeats theta for the unused theta_z), and d."""
    d = 3 if theta_z is not None else 2
    params = [t.contiguous() for t in (sigma, theta_y, theta_z if d == 3 else theta_y, *amplitudes)]
    return params, d


def _param_grads(grads: list[Tensor], d: int) -> tuple:
    """Gradients in the order of the Functions' parameter arguments (theta_z None in 2D)."""
    return grads[0], grads[1], grads[2] if d == 3 else None, *grads[3:]


def _native_expand(params: list[Tensor], d: int, k: int, channels_last: bool) -> tuple[Tensor, ...]:
    """The (cout, cin, k, .., k) weight from the parameters by the C kernels, in the layout asked, and the
    rows q, e it was expanded from."""
    q, e = _native_rows(params, d)
    (cout, cin), pairs = params[0].shape, params[0].numel()
    # (cout, k.., cin) is the channels-last memory of the (cout, cin, k.., k) weight
    shape = (cout, *[k] * d, cin) if channels_last else (cout, cin, *[k] * d)
    out = params[0].new_empty(shape)
    # a weight larger than the last-level cache goes past it (non-temporal stores; see csrc put_row)
    stream = out.numel() * out.element_size() > last_level_cache_bytes()
    layout = (0 if channels_last else LAYOUT_CONTIGUOUS) | (LAYOUT_STREAM if stream else 0)
    args = (_pointer(q), _pointer(e), _pointer(out), *_longs(pairs, cin), d, k, layout)
    expand = getattr(native.library(), f"gabor_expand_{_SUFFIX[q.dtype]}")
    _run_chunked(expand, cout * -(-cin // BLOCK), BLOCK, *args)
    return (out.movedim(-1, 1) if channels_last else out), q, e  # (cout, cin, k, .., k)


class _NativeGabor(torch.autograd.Function):
    """`expand_torch(rows_torch(...))` by the C kernels: parameters -> q, e -> taps, and back."""

    @staticmethod
    def forward(ctx, k: int, channels_last: bool, sigma, theta_y, theta_z, *amplitudes) -> Tensor:
        params, d = _contiguous_params(sigma, theta_y, theta_z, amplitudes)
        out, q, e = _native_expand(params, d, k, channels_last)
        ctx.save_for_backward(*params, q, e)
        ctx.k, ctx.d, ctx.channels_last = k, d, channels_last
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        *params, q, e = ctx.saved_tensors
        d, k = ctx.d, ctx.k
        (cout, cin), pairs = params[0].shape, params[0].numel()
        if ctx.channels_last:
            grad = grad.movedim(1, -1).contiguous()  # (cout, k.., cin): no copy when it is channels-last
        else:
            grad = grad.contiguous()  # (cout, cin, k..)
        dq = torch.empty_like(q)
        layout = int(not ctx.channels_last)
        args = (_pointer(q), _pointer(e), _pointer(grad), _pointer(dq), *_longs(pairs, cin), d, k, layout)
        expand_backward = getattr(native.library(), f"gabor_expand_backward_{_SUFFIX[q.dtype]}")
        _run_chunked(expand_backward, cout * -(-cin // BLOCK), BLOCK, *args)
        return None, None, *_param_grads(_native_rows_backward(params, dq, d), d)


class _NativeGaborConv(torch.autograd.Function):
    """'Same' convolution of x with the generated weight (`direct_conv` or `direct_contiguous_conv`) whose
    parameters' gradient is formed from x and the output gradient block by block by the C kernels
    (csrc gabor_conv_backward), never as dL/dW: for small volumes, see `fused_gradient_pays`."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, impl: str, bias, sigma, theta_y, theta_z, *amplitudes) -> Tensor:
        params, d = _contiguous_params(sigma, theta_y, theta_z, amplitudes)
        weight, q, e = _native_expand(params, d, k, channels_last=weight_channels_last(x, impl))
        ctx.save_for_backward(x, weight, *params, q, e)
        ctx.k, ctx.d, ctx.contiguous = k, d, impl == "direct_contiguous"
        return (direct_contiguous_conv if ctx.contiguous else direct_conv)(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, *params, q, e = ctx.saved_tensors
        d, k, needs = ctx.d, ctx.k, ctx.needs_input_grad
        grad_x = grad_bias = None
        if needs[0]:  # the input gradient by oneDNN, with the tensors of the forward's convolution
            xs, gs = (x.contiguous(), grad.contiguous()) if ctx.contiguous else (x, grad)
            ones, pads = [1] * d, [k // 2] * d
            grad_x = torch.ops.aten.convolution_backward(
                gs, xs, weight, None, ones, pads, ones, False, [0] * d, 1, [True, False, False]
            )[0]
        if needs[3]:
            grad_bias = grad.sum(dim=(0, *range(2, 2 + d)))
        grads = [None] * len(params)
        if any(needs[4:]):
            (cout, cin), pairs = params[0].shape, params[0].numel()
            x_last = x.movedim(1, -1).contiguous()  # (B, *S, cin): no copy when channels-last
            grad_last = grad.movedim(1, -1).contiguous()
            dq = torch.empty_like(q)
            sizes = (ctypes.c_long * d)(*x.shape[2:])
            lib, suffix = native.library(), _SUFFIX[q.dtype]
            pointers = (_pointer(q), _pointer(e), _pointer(x_last), _pointer(grad_last), _pointer(dq))
            args = (*pointers, *_longs(pairs, cin, cout), d, k, sizes, ctypes.c_long(x.shape[0]))
            # a block's work is ~4 times its expansion's (the correlation, then the same reduction)
            conv_backward = getattr(lib, f"gabor_conv_backward_{suffix}")
            _run_chunked(conv_backward, cout * -(-cin // BLOCK), 4 * BLOCK, *args)
            grads = _native_rows_backward(params, dq, d)
        return grad_x, None, None, grad_bias, *_param_grads(grads, d)


class _NativeGaborSpectrum(torch.autograd.Function):
    """`kernel_spectrum(expand_torch(rows_torch(...)), sizes)` by the C kernels (csrc/spectrum_impl.h):
    parameters -> q, e -> the conjugate spectrum of the zero-padded kernels, and back."""

    @staticmethod
    def forward(ctx, k: int, sizes: tuple[int, ...], sigma, theta_y, theta_z, *amplitudes) -> Tensor:
        params, d = _contiguous_params(sigma, theta_y, theta_z, amplitudes)
        q, e = _native_rows(params, d)
        (cout, cin), pairs = sigma.shape, sigma.numel()
        freqs = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
        out = sigma.new_empty(2, freqs, cin, cout)
        c_sizes = (ctypes.c_long * d)(*sizes)
        args = (_pointer(q), _pointer(e), _pointer(out), *_longs(pairs, cin, cout), d, k, c_sizes)
        spectrum = getattr(native.library(), f"gabor_spectrum_{_SUFFIX[q.dtype]}")
        _run_chunked(spectrum, cin * -(-cout // BLOCK), BLOCK, *args)
        ctx.save_for_backward(*params, q, e)
        ctx.k, ctx.d, ctx.sizes = k, d, sizes
        return out  # (re/im, F, cin, cout)

    @staticmethod
    def backward(ctx, grad: Tensor):
        *params, q, e = ctx.saved_tensors
        d, k = ctx.d, ctx.k
        (cout, cin), pairs = params[0].shape, params[0].numel()
        grad = grad.contiguous()
        dq = torch.empty_like(q)
        c_sizes = (ctypes.c_long * d)(*ctx.sizes)
        pointers = (_pointer(q), _pointer(e), _pointer(grad), _pointer(dq))
        args = (*pointers, *_longs(pairs, cin, cout), d, k, c_sizes)
        spectrum_backward = getattr(native.library(), f"gabor_spectrum_backward_{_SUFFIX[q.dtype]}")
        _run_chunked(spectrum_backward, cin * -(-cout // BLOCK), BLOCK, *args)
        return None, None, *_param_grads(_native_rows_backward(params, dq, d), d)


class _NativeSpectralProduct(torch.autograd.Function):
    """`fftconv._channel_product(x, gabor_spectrum(...))` without the spectrum (csrc/spectral_impl.h): each
    block of it is built from the pairs' 1D transforms where the product uses it, forward and backward."""

    @staticmethod
    def forward(
        ctx, x: Tensor, k: int, sizes: tuple[int, ...], sigma, theta_y, theta_z, *amplitudes
    ) -> Tensor:
        params, d = _contiguous_params(sigma, theta_y, theta_z, amplitudes)
        q, e = _native_rows(params, d)
        lib, suffix = native.library(), _SUFFIX[q.dtype]
        (cout, cin), pairs = sigma.shape, sigma.numel()
        freqs, tiles = x.shape[:2]
        blocks, c_sizes = cin * -(-cout // BLOCK), (ctypes.c_long * d)(*sizes)
        tables = q.new_empty(blocks, getattr(lib, f"spectral_table_length_{suffix}")(d, c_sizes))
        args = (_pointer(q), _pointer(e), _pointer(tables), *_longs(pairs, cin, cout), d, k, c_sizes)
        _run_chunked(getattr(lib, f"spectral_tables_{suffix}"), blocks, BLOCK, *args)
        x = x.contiguous()  # (F, T, cin, re/im)
        # plain tensors: x may be a MONAI MetaTensor, whose new_empty rejects a size given as ints
        out = torch.empty((freqs, tiles, cout, 2), dtype=x.dtype, device=x.device)
        args = (_pointer(tables), _pointer(x), _pointer(out), *_longs(cin, cout, tiles), d, c_sizes)
        _run_chunked(getattr(lib, f"spectral_forward_{suffix}"), sizes[0], _per_row(x, cout, sizes), *args)
        ctx.save_for_backward(x, tables, *params, q, e)
        ctx.k, ctx.d, ctx.sizes = k, d, sizes
        return out  # (F, T, cout, re/im)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, tables, *params, q, e = ctx.saved_tensors
        d, k, sizes = ctx.d, ctx.k, ctx.sizes
        lib, suffix = native.library(), _SUFFIX[q.dtype]
        (cout, cin), pairs = params[0].shape, params[0].numel()
        freqs, tiles = x.shape[:2]
        c_sizes = (ctypes.c_long * d)(*sizes)
        coutp = -(-cout // BLOCK) * BLOCK
        padded = torch.zeros(
            (freqs, tiles, 2, coutp), dtype=grad.dtype, device=grad.device
        )  # (F, T, 2, coutp)
        padded[..., :cout] = grad.transpose(2, 3)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            args = (
                _pointer(tables),
                _pointer(padded),
                _pointer(grad_x),
                *_longs(cin, cout, tiles),
                d,
                c_sizes,
            )
            input_backward = getattr(lib, f"spectral_backward_input_{suffix}")
            _run_chunked(input_backward, sizes[0], _per_row(x, cout, sizes), *args)
        dq = torch.empty_like(q)
        pointers = (_pointer(q), _pointer(e), _pointer(x), _pointer(padded), _pointer(dq))
        args = (*pointers, *_longs(pairs, cin, cout, tiles))
        kernel_backward = getattr(lib, f"spectral_backward_kernel_{suffix}")
        per_block = max(1, BLOCK * freqs * tiles // 64)  # ~64 products per pair unit, like `_per_row`
        _run_chunked(kernel_backward, cin * -(-cout // BLOCK), per_block, *args, d, k, c_sizes)
        return grad_x, None, None, *_param_grads(_native_rows_backward(params, dq, d), d)


def _per_row(x: Tensor, cout: int, sizes: tuple[int, ...]) -> int:
    """The work of one f0 unit of the fused product, in `_run_chunked`'s pair units (~64 products each)."""
    return max(1, x.shape[1] * x.shape[2] * cout * math.prod(sizes[1:-1]) * (sizes[-1] // 2 + 1) // 64)


def native_available(t: Tensor) -> bool:
    """Whether `gabor_weight` runs the C kernels for parameters like t."""
    return (
        t.device.type == "cpu"
        and t.dtype in _SUFFIX
        and not torch.compiler.is_compiling()
        and native.library() is not None
    )


def gabor_weight(
    sigma, angles: tuple[Tensor, ...], a_re, a_im, f_re, f_im, psi, k: int, channels_last: bool = True
) -> Tensor:
    """The (cout, cin, k, .., k) weight of eq. 2 from (cout, cin) parameters (sigma > 0, angles as in
    `direction`).

    Differentiable in all of them; the C kernels on CPU, written in the channels-last or the contiguous
    memory layout as asked, PyTorch operations otherwise (contiguous); the same values up to float rounding.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"Gabor kernel size must be a positive odd integer, got {k}")
    amplitudes = (a_re, a_im, f_re, f_im, psi)
    if native_available(sigma):
        theta_z = angles[1] if len(angles) == 2 else None
        return _NativeGabor.apply(k, channels_last, sigma, angles[0], theta_z, *amplitudes)
    return expand_torch(rows_torch(sigma, angles, *amplitudes), k)


def fused_gradient_pays(batch: int, spatial: tuple[int, ...], k: int) -> bool:
    """Whether `gabor_conv` (the parameters' gradient formed in the C reduction) beats materialising dL/dW
    for a 'same' convolution of k^d taps over `batch` volumes of size `spatial`: when every tap's gradient
    is a short sum, batch x (voxels v with v + r inside) at most FUSED_GRAD_MAX_PER_TAP[d] products per tap
    on average. In 3D that is the deepest levels: 4^3 (12 per tap and sample), 6^3 (79), 8^3 with one or
    two samples (248 each), not 16^3 (2915); 2D images up to 8^2 with one sample (40 per tap).
    `python scripts/bench.py --sections gradient` measures both paths around the limits."""
    h = k // 2
    products = batch * math.prod(sum(max(0, n - abs(r)) for r in range(-h, h + 1)) for n in spatial)
    return products <= FUSED_GRAD_MAX_PER_TAP[len(spatial)] * k ** len(spatial)


def gabor_conv(
    x: Tensor, sigma, angles: tuple[Tensor, ...], a_re, a_im, f_re, f_im, psi, k: int, bias, impl: str
) -> Tensor:
    """'Same' convolution of x (B, cin, *S) by the Gabor weight `gabor_weight(..., k)` (impl "direct" or
    "direct_contiguous", as `medexp.nn.fftconv.same_conv`) whose parameters' gradient the C kernels form from
    x and the output gradient block by block, never holding dL/dW (csrc gabor_conv_backward); callers check
    `native_available` and `fused_gradient_pays` first. Differentiable in x, bias and all parameters."""
    if not native_available(sigma):
        raise RuntimeError("gabor_conv needs medexp's C kernels (CPU, float32/float64)")
    if impl not in ("direct", "direct_contiguous"):
        raise ValueError(f"gabor_conv: impl must be direct or direct_contiguous, got {impl!r}")
    shape_ok = x.dim() == len(angles) + 3 and x.shape[1] == sigma.shape[1]
    if not shape_ok or x.dtype != sigma.dtype or x.device != sigma.device or k < 1 or k % 2 == 0:
        raise ValueError(
            f"gabor_conv: input {tuple(x.shape)} {x.dtype} and kernel size {k} do not match parameters "
            f"{tuple(sigma.shape)} {sigma.dtype}; expected (B, cin, *spatial) of the same dtype, odd k"
        )
    theta_z = angles[1] if len(angles) == 2 else None
    amplitudes = (a_re, a_im, f_re, f_im, psi)
    return _NativeGaborConv.apply(x, k, impl, bias, sigma, angles[0], theta_z, *amplitudes)


def gabor_spectral_product(
    x: Tensor, sigma, angles: tuple[Tensor, ...], a_re, a_im, f_re, f_im, psi, k: int, sizes: tuple[int, ...]
) -> Tensor:
    """The FFT convolution's channel product of input spectra x (F, T, cin, re/im) with the Gabor kernel
    spectrum `gabor_spectrum(..., k, sizes)`, (F, T, cout, re/im): per frequency and tile the complex sum over
    input channels of x K. The C kernels never hold the spectrum (csrc/spectral_impl.h); callers check
    `native_available` first. Differentiable in x and all parameters."""
    if not native_available(sigma):
        raise RuntimeError("gabor_spectral_product needs medexp's C kernels (CPU, float32/float64)")
    shape_ok = x.dim() == 4 and tuple(x.shape[2:]) == (sigma.shape[1], 2)
    if not shape_ok or x.dtype != sigma.dtype or x.device != sigma.device:
        raise ValueError(
            f"gabor_spectral_product: input spectra {tuple(x.shape)} {x.dtype} do not match parameters "
            f"{tuple(sigma.shape)} {sigma.dtype}; expected (F, T, cin, 2) of the same dtype and device"
        )
    theta_z = angles[1] if len(angles) == 2 else None
    amplitudes = (a_re, a_im, f_re, f_im, psi)
    return _NativeSpectralProduct.apply(x, k, tuple(sizes), sigma, angles[0], theta_z, *amplitudes)


def gabor_spectrum(
    sigma, angles: tuple[Tensor, ...], a_re, a_im, f_re, f_im, psi, k: int, sizes: tuple[int, ...]
) -> Tensor:
    """The kernel spectrum `medexp.nn.fftconv.kernel_spectrum(W, sizes)` of the weight W = `gabor_weight(...,
    k)`, (2, F, cin, cout): on CPU straight from the separable factors by the C kernels (no k^d taps, no
    pruned DFT over them), elsewhere through W. Differentiable in all parameters.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"Gabor kernel size must be a positive odd integer, got {k}")
    if len(sizes) != len(angles) + 1 or min(sizes) < 4 or any(n % 2 for n in sizes):
        raise ValueError(f"gabor_spectrum: sizes must be even FFT lengths >= 4, one per axis, got {sizes}")
    amplitudes = (a_re, a_im, f_re, f_im, psi)
    if native_available(sigma):
        theta_z = angles[1] if len(angles) == 2 else None
        return _NativeGaborSpectrum.apply(k, tuple(sizes), sigma, angles[0], theta_z, *amplitudes)
    return kernel_spectrum(expand_torch(rows_torch(sigma, angles, *amplitudes), k), tuple(sizes))
