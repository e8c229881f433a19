"""Separable generation of Gabor weights: eq. 2's parameters per channel pair -> its k^d taps, fast.

Why: a layer generates cin * cout kernels of k^d taps (up to 37k pairs of 343 taps) on every training
step, forward and backward. Evaluated as written (`medexp.nn.gabor.gabor_kernel3d`) that is ~80 full-size
elementwise operations whose intermediates autograd keeps, which cost more than the convolution they feed
on small volumes.

How: a separable factorisation. With c_0 = a_re e^{i psi} for the cosine term of eq. 2, c_1 = -i a_im
e^{i psi} for the sine term, w_jt = 2 pi u_j f_t (u the unit direction of x', see docs/design.md §5) and
s = 1 / (2 sigma^2), every term factorises over the axes, so per pair (o, i)

    W[o, i, a, b, c] = sum_t Re(c_t phi_0[a, t] phi_1[b, t] phi_2[c, t]),
    phi_j[a, t] = exp(-s r_a^2) e^{i w_jt r_a}

(r_a = a - k // 2; 2D drops the middle axis): a kernel is the real part of two rank-1 complex tensors,
fixed by the row q = (s, w_00, w_01, ..., w_(d-1)1, Re c_0, Im c_0, Re c_1, Im c_1) of 1 + 2 d + 4 numbers.

- `native_weight`: the C kernels (csrc/rows_impl.h: parameters -> q, vectorised over pairs;
  csrc/separable_impl.h: q -> taps, 16 pairs at a time in vector registers, one pass over the taps each
  way), written straight into the memory layout the convolution runs in (channels-last, or contiguous),
  which is also the layout its gradient arrives in.
- `rows_torch` + `expand_torch`: the same factorisation in PyTorch operations, for devices and builds
  without the C kernels (CUDA, torch.compile, no compiler): autograd keeps k-sized factors instead of
  k^d-sized intermediates. In 3D that is also faster than the formula; in 2D (49 taps) the formula is
  faster, so there the fallback is the formula (`scripts/bench.py --sections generation`).
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from medexp.nn.fast import native

LAYOUT_CONTIGUOUS, LAYOUT_STREAM = 1, 2  # gabor_expand's layout flags (csrc/separable.c)
DEFAULT_CACHE_BYTES = 32 << 20  # when sysfs does not say


def row_length(d: int) -> int:
    """Numbers per pair in q for d spatial dims: s, 2 frequencies per axis, 2 complex amplitudes."""
    return 1 + 2 * d + 4


def split_params(params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, ...]]:
    """(sigma, theta_y, theta_z or None in 2D, (a_re, a_im, f_re, f_im, psi)) from eq. 2's arguments in
    the order of `gabor_kernel3d` (sigma, theta_y, theta_z, ...) or `gabor_kernel2d` (sigma, theta, ...)."""
    if len(params) not in (7, 8):
        raise ValueError(f"expected the 7 (2D) or 8 (3D) parameters of eq. 2, got {len(params)}")
    sigma, theta_y, *rest = params
    theta_z = rest.pop(0) if len(params) == 8 else None
    return sigma, theta_y, theta_z, tuple(rest)


def dims(params: tuple[Tensor, ...]) -> int:
    """Spatial dims of eq. 2's parameter tuple: 3 for 8 parameters, 2 for 7."""
    return len(params) - 5


def direction(angles: tuple[Tensor, ...]) -> Tensor:
    """The unit direction u of x' along the weight's spatial axes, (cout, cin, d) (docs/design.md §5):
    3D (theta_y, theta_z): x' = sin(ty) z - cos(ty) sin(tz) y + cos(ty) cos(tz) x, axes (D, H, W);
    2D (theta,): x' = x cos(theta) + y sin(theta), axes (H, W)."""
    if len(angles) == 2:
        theta_y, theta_z = angles
        cos_y = torch.cos(theta_y)
        return torch.stack([torch.sin(theta_y), -cos_y * torch.sin(theta_z), cos_y * torch.cos(theta_z)], -1)
    (theta,) = angles
    return torch.stack([torch.sin(theta), torch.cos(theta)], -1)


def rows_torch(params: tuple[Tensor, ...]) -> Tensor:
    """q (cout, cin, 1 + 2d + 4) from eq. 2's (cout, cin) parameters (sigma > 0)."""
    sigma, *angles_and_rest = params
    angles, (a_re, a_im, f_re, f_im, psi) = angles_and_rest[:-5], angles_and_rest[-5:]
    s = 1 / (2 * sigma**2)  # g(r) = exp(-s r^2)
    frequencies = torch.stack([f_re, f_im], -1)[..., None, :]  # (cout, cin, 1, 2)
    omega = 2 * math.pi * direction(tuple(angles))[..., None] * frequencies  # (cout, cin, d, 2)
    cos_psi, sin_psi = torch.cos(psi), torch.sin(psi)
    # c_0 = a_re e^{i psi} (cosine term), c_1 = -i a_im e^{i psi} (sine term), as (re, im) pairs
    coef = torch.stack([a_re * cos_psi, a_re * sin_psi, a_im * sin_psi, -a_im * cos_psi], -1)  # (.., 4)
    return torch.cat([s[..., None], omega.flatten(-2), coef], -1)  # (cout, cin, 1 + 2d + 4)


def expand_torch(q: Tensor, k: int) -> Tensor:
    """The taps from q by PyTorch operations: (cout, cin, 1 + 2d + 4) -> (cout, cin, k, .., k)."""
    d = (q.shape[-1] - 5) // 2
    if q.dim() != 3 or d not in (2, 3) or q.shape[-1] != row_length(d):
        raise ValueError(f"q must be (cout, cin, 9) in 2D or (cout, cin, 11) in 3D, got {tuple(q.shape)}")
    cout, cin = q.shape[:2]
    q = q.reshape(cout * cin, -1)  # (P, 1 + 2d + 4): one row per pair
    pairs = q.shape[0]
    r = torch.arange(k, device=q.device, dtype=q.dtype) - k // 2  # (k,) offsets
    envelope = torch.exp(-q[:, :1] * r * r)  # (P, k)
    omega = q[:, 1 : 1 + 2 * d].reshape(pairs, d, 1, 2)  # (P, axis, 1, term)
    phi = torch.polar(envelope[:, None, :, None].expand(-1, d, -1, 2), omega * r[:, None])  # (P, d, k, 2)
    amplitudes = q[:, 1 + 2 * d :].reshape(pairs, 2, 2)  # (P, term, re/im)
    c = torch.complex(amplitudes[..., 0], amplitudes[..., 1])  # (P, term)
    trail = c[:, None, :] * phi[:, d - 1]  # (P, k, term): c times the last axis' factor
    for axis in reversed(range(1, d - 1)):
        trail = (phi[:, axis, :, None, :] * trail[:, None, :, :]).flatten(1, 2)  # (P, k^(d-axis), term)
    # Re(first . trail) summed over both terms = [re, -im] of first . [re, im] of trail: one batched GEMM of
    # inner size 4, shaped (k x 4)(4 x k^(d-1)), the faster of the two orientations.
    first = torch.view_as_real(phi[:, 0].conj().resolve_conj()).reshape(pairs, k, 4)  # (P, k, term re/im)
    right = torch.view_as_real(trail).reshape(pairs, -1, 4).transpose(1, 2)  # (P, 4, k^(d-1))
    return torch.bmm(first, right).view(cout, cin, *[k] * d)  # (cout, cin, k, .., k)


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


def c_params(params: tuple[Tensor, ...]) -> list[Tensor]:
    """The 8 contiguous parameter tensors the C kernels read (2D repeats theta for the unused theta_z)."""
    sigma, theta_y, theta_z, amplitudes = split_params(params)
    return [t.contiguous() for t in (sigma, theta_y, theta_y if theta_z is None else theta_z, *amplitudes)]


def native_rows(params: list[Tensor], d: int) -> tuple[Tensor, Tensor]:
    """q and e (csrc/rows_impl.h) from the 8 `c_params`, by the C kernel: q one row per number (1 + 2d + 4,
    pairs), e = exp(-s) and cos, sin of every frequency (1 + 4d, pairs)."""
    pairs = params[0].numel()
    q = params[0].new_empty(row_length(d), pairs)
    e = params[0].new_empty(1 + 4 * d, pairs)
    pointers = [native.pointer(t) for t in params]
    rows = native.function("gabor_rows", q.dtype)
    native.run_chunked(
        rows, pairs, 1, *pointers, native.pointer(q), native.pointer(e), *native.longs(pairs), d
    )
    return q, e


def native_rows_backward(params: list[Tensor], dq: Tensor, d: int) -> tuple[Tensor | None, ...]:
    """The gradients of eq. 2's parameters (in `split_params` order, 7 in 2D) from dL/dq, by the C kernel."""
    grads = [torch.empty_like(t) for t in params]
    pointers = [native.pointer(t) for t in (*params, dq, *grads)]
    pairs = dq.shape[1]
    backward = native.function("gabor_rows_backward", dq.dtype)
    native.run_chunked(backward, pairs, 1, *pointers, *native.longs(pairs), d)
    return tuple(grads) if d == 3 else (grads[0], grads[1], *grads[3:])


def native_expand(params: list[Tensor], d: int, k: int, channels_last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The (cout, cin, k, .., k) weight from the 8 `c_params` by the C kernels, in the layout asked, and
    the rows q, e it was expanded from."""
    q, e = native_rows(params, d)
    (cout, cin), pairs = params[0].shape, params[0].numel()
    # (cout, k.., cin) is the channels-last memory of the (cout, cin, k.., k) weight
    shape = (cout, *[k] * d, cin) if channels_last else (cout, cin, *[k] * d)
    out = params[0].new_empty(shape)
    # a weight larger than the last-level cache would only pass through it, evicting what the convolution
    # reads next: non-temporal stores (csrc put_row)
    stream = out.numel() * out.element_size() > last_level_cache_bytes()
    layout = (0 if channels_last else LAYOUT_CONTIGUOUS) | (LAYOUT_STREAM if stream else 0)
    pointers = [native.pointer(t) for t in (q, e, out)]
    args = (*pointers, *native.longs(pairs, cin), d, k, layout)
    expand = native.function("gabor_expand", q.dtype)
    native.run_chunked(expand, cout * -(-cin // native.BLOCK), native.BLOCK, *args)
    return (out.movedim(-1, 1) if channels_last else out), q, e  # (cout, cin, k, .., k)


class _NativeWeight(torch.autograd.Function):
    """`expand_torch(rows_torch(params))` by the C kernels: parameters -> q, e -> taps, and back."""

    @staticmethod
    def forward(ctx, k: int, channels_last: bool, *params: Tensor) -> Tensor:
        d = dims(params)
        flat = c_params(params)
        out, q, e = native_expand(flat, d, k, channels_last)
        ctx.save_for_backward(*flat, q, e)
        ctx.k, ctx.d, ctx.channels_last = k, d, channels_last
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        *flat, q, e = ctx.saved_tensors
        d, k = ctx.d, ctx.k
        (cout, cin), pairs = flat[0].shape, flat[0].numel()
        grad = grad.to(q.dtype)  # the C kernels read q's type (a backward run under autocast may differ)
        if ctx.channels_last:
            grad = grad.movedim(1, -1).contiguous()  # (cout, k.., cin): no copy when it is channels-last
        else:
            grad = grad.contiguous()  # (cout, cin, k..)
        dq = torch.empty_like(q)
        pointers = [native.pointer(t) for t in (q, e, grad, dq)]
        args = (*pointers, *native.longs(pairs, cin), d, k, int(not ctx.channels_last))
        backward = native.function("gabor_expand_backward", q.dtype)
        native.run_chunked(backward, cout * -(-cin // native.BLOCK), native.BLOCK, *args)
        return None, None, *native_rows_backward(flat, dq, d)


def native_weight(params: tuple[Tensor, ...], k: int, channels_last: bool = True) -> Tensor:
    """The (cout, cin, k, .., k) weight of eq. 2 from its (cout, cin) parameters (`gabor_kernel3d`'s
    order, sigma > 0) by the C kernels, laid out channels-last or contiguous in memory; differentiable in
    every parameter. Callers check `native.available` first."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"Gabor kernel size must be a positive odd integer, got {k}")
    return _NativeWeight.apply(k, channels_last, *params)


def torch_weight(params: tuple[Tensor, ...], k: int) -> Tensor:
    """The weight of eq. 2 by the separable PyTorch operations: `expand_torch(rows_torch(params), k)`."""
    return expand_torch(rows_torch(params), k)
