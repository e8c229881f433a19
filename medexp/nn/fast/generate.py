"""Generation of weights that are sums of separable complex kernels: 1D factors per axis -> k^d taps, fast.

Why: a Gabor layer generates cin * cout kernels of k^d taps (up to 37k pairs of 343 taps) on every training
step, forward and backward. Evaluated as written (`medexp.nn.gabor.gabor_kernel3d`) that is ~80 full-size
elementwise operations whose intermediates autograd keeps, which cost more than the convolution they feed
on small volumes.

How: every kernel here is given by its separable factors (medexp.nn.gabor_separable.gabor_factors computes
a Gabor layer's from eq. 2, under autograd), per channel pair (o, i) two terms t of d complex 1D factors:

    W[o, i, a, b, c] = sum_t Re(F_0,t[a] F_1,t[b] F_2,t[c])        (2D: no middle axis)

factors: (d, k, 2, 2, cout, cin), F_j,t[a] as (re, im), the channel pairs innermost. This module knows
nothing of what the factors mean: it multiplies them out, and hands the factors' gradient back to autograd.

- `native_weight`: the C kernels (csrc/separable_impl.h: factors -> taps, 16 pairs at a time in vector
  registers, one pass over the taps each way), written straight into the memory layout the convolution
  runs in (channels-last, or contiguous), which is also the layout its gradient arrives in.
- `torch_weight`: the same expansion in PyTorch operations, for devices and builds without the C kernels
  (CUDA, torch.compile, no compiler), 3D only: autograd keeps k-sized factors instead of k^d-sized
  intermediates, which in 3D is also faster than the formula; in 2D (49 taps) the formula is faster, so
  there the fallback is the formula (`scripts/bench.py --sections generation`).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from medexp.nn.fast import native

LAYOUT_CONTIGUOUS, LAYOUT_STREAM = 1, 2  # separable_expand's layout flags (csrc/separable.c)
DEFAULT_CACHE_BYTES = 32 << 20  # when sysfs does not say


def check_factors(factors: Tensor) -> tuple[int, int, int, int]:
    """(d, k, cout, cin) of a factor tensor (d, k, 2, 2, cout, cin); ValueError for any other shape."""
    shape = tuple(factors.shape)
    if len(shape) != 6 or shape[0] not in (2, 3) or shape[2:4] != (2, 2) or shape[1] % 2 == 0:
        raise ValueError(f"separable factors must be (d, k, 2, 2, cout, cin), d 2 or 3, k odd, got {shape}")
    return shape[0], shape[1], shape[4], shape[5]


def expand_torch(factors: Tensor) -> Tensor:
    """The 3D taps from the factors by PyTorch operations: (3, k, 2, 2, cout, cin) -> (cout, cin, k, k, k)."""
    d, k, cout, cin = check_factors(factors)
    if d != 3:
        raise ValueError(f"expand_torch expands 3D factors (3, k, 2, 2, cout, cin), got {factors.shape}")
    pairs = cout * cin
    z = torch.complex(factors[:, :, :, 0], factors[:, :, :, 1])  # (axis, k, term, cout, cin)
    z = z.permute(3, 4, 0, 1, 2).reshape(pairs, d, k, 2)  # (P, axis, k, term): a copy of the factors
    trail = (z[:, 1, :, None, :] * z[:, 2, None, :, :]).flatten(1, 2)  # (P, k^2, term): the last two axes
    # Re(first . trail) summed over both terms = [re, -im] of first . [re, im] of trail: one batched GEMM of
    # inner size 4, shaped (k x 4)(4 x k^2), the faster of the two orientations.
    first = torch.view_as_real(z[:, 0].conj().resolve_conj()).reshape(pairs, k, 4)  # (P, k, term re/im)
    right = torch.view_as_real(trail).reshape(pairs, -1, 4).transpose(1, 2)  # (P, 4, k^2)
    return torch.bmm(first, right).view(cout, cin, k, k, k)


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


def native_expand(factors: Tensor, channels_last: bool) -> Tensor:
    """The (cout, cin, k, .., k) weight from contiguous factors by the C kernels, in the layout asked."""
    d, k, cout, cin = check_factors(factors)
    # (cout, k.., cin) is the channels-last memory of the (cout, cin, k.., k) weight
    shape = (cout, *[k] * d, cin) if channels_last else (cout, cin, *[k] * d)
    out = factors.new_empty(shape)
    # a weight larger than the last-level cache would only pass through it, evicting what the convolution
    # reads next: non-temporal stores (csrc put_row)
    stream = out.numel() * out.element_size() > last_level_cache_bytes()
    layout = (0 if channels_last else LAYOUT_CONTIGUOUS) | (LAYOUT_STREAM if stream else 0)
    args = (native.pointer(factors), native.pointer(out), cout * cin, cin, d, k, layout)
    expand = native.function("separable_expand", factors.dtype)
    native.run_chunked(expand, cout * -(-cin // native.BLOCK), native.BLOCK, *args)
    return out.movedim(-1, 1) if channels_last else out  # (cout, cin, k, .., k)


class _NativeWeight(torch.autograd.Function):
    """`expand_torch(factors)` by the C kernels: factors -> taps, and the taps' gradient -> the factors'."""

    @staticmethod
    def forward(ctx, channels_last: bool, factors: Tensor) -> Tensor:
        factors = factors.contiguous()  # a no-op for gabor_factors' result
        ctx.save_for_backward(factors)
        ctx.channels_last = channels_last
        return native_expand(factors, channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (factors,) = ctx.saved_tensors
        d, k, cout, cin = check_factors(factors)
        grad = grad.to(factors.dtype)  # the C kernels read the factors' type (a backward under autocast)
        if ctx.channels_last:
            grad = grad.movedim(1, -1).contiguous()  # (cout, k.., cin): no copy when it is channels-last
        else:
            grad = grad.contiguous()  # (cout, cin, k..)
        dfac = torch.empty_like(factors)
        pointers = [native.pointer(t) for t in (factors, grad, dfac)]
        args = (*pointers, cout * cin, cin, d, k, int(not ctx.channels_last))
        backward = native.function("separable_expand_backward", factors.dtype)
        native.run_chunked(backward, cout * -(-cin // native.BLOCK), native.BLOCK, *args)
        return None, dfac


def native_weight(factors: Tensor, channels_last: bool = True) -> Tensor:
    """The (cout, cin, k, .., k) weight of the separable factors (d, k, 2, 2, cout, cin) by the C kernels,
    laid out channels-last or contiguous in memory; differentiable in the factors. Callers check
    `native.available` first."""
    check_factors(factors)
    return _NativeWeight.apply(channels_last, factors)


def torch_weight(factors: Tensor) -> Tensor:
    """The 3D weight of the separable factors by PyTorch operations (`expand_torch`), on any device."""
    return expand_torch(factors)
