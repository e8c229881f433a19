"""The direct convolution with a weight given by separable factors whose gradient never materialises dL/dW.

Why: on the deepest levels of the network (4^3-8^3 voxels, up to 192 -> 192 channels) every number of
the k^d weight gradient dL/dW is a short sum (a few dozen products per sample), yet oneDNN writes all of
them (50 MB for 192 x 192 x 7^3), PyTorch copies them between memory layouts and the generation's backward
reads them back. A Gabor layer needs dL/dW only contracted with the derivatives of its taps w.r.t. its
separable factors (medexp.nn.fast.generate), so per block of 16 channel pairs the C kernel
(csrc/separable_impl.h separable_conv_backward) correlates the input with the output gradient into a
k^d-tap tile in cache and reduces that tile onto the pair's factors at once. The input gradient stays
with oneDNN. It pays only while those sums are short: `fused_gradient_pays`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medexp.nn.fast import native
from medexp.nn.fast.direct import direct_conv, weight_channels_last
from medexp.nn.fast.generate import check_factors, native_expand

# Products per tap up to which the fused gradient beats materialising dL/dW, per spatial dims
# (`python scripts/bench.py --sections gradient` measures both sides around these limits).
FUSED_GRAD_MAX_PER_TAP = {2: 48, 3: 512}


def fused_gradient_pays(batch: int, spatial: tuple[int, ...], k: int) -> bool:
    """Whether `fused_gradient_conv` beats dL/dW for a 'same' convolution of k^d taps over `batch`
    volumes of size `spatial`: when every tap's gradient is a short sum, batch x (voxels v with v + r
    inside) at most FUSED_GRAD_MAX_PER_TAP[d] products per tap on average. In 3D that is 4^3 (12 per tap
    and sample), 6^3 (79), 8^3 with one or two samples (248 each), not 16^3 (2915); in 2D images up to 8^2
    with one sample (40 per tap)."""
    h = k // 2
    products = batch * math.prod(sum(max(0, n - abs(r)) for r in range(-h, h + 1)) for n in spatial)
    return products <= FUSED_GRAD_MAX_PER_TAP[len(spatial)] * k ** len(spatial)


class _FusedGradientConv(torch.autograd.Function):
    """'Same' convolution of x with the C-generated weight; backward: the input gradient by oneDNN with
    the forward's tensors, the factors' gradient from x and the output gradient block by block."""

    @staticmethod
    def forward(ctx, x: Tensor, contiguous: bool, bias: Tensor | None, factors: Tensor) -> Tensor:
        factors = factors.contiguous()  # a no-op for gabor_factors' result
        weight = native_expand(factors, weight_channels_last(x, contiguous))
        ctx.save_for_backward(x, weight, factors)
        ctx.contiguous = contiguous
        return direct_conv(x, weight, bias, contiguous)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, factors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d, k, cout, cin = check_factors(factors)
        grad = grad.to(x.dtype)  # the C kernels read x's type (a backward run under autocast may differ)
        grad_x = grad_bias = dfac = None
        if needs[0]:  # the input gradient by oneDNN, with the tensors of the forward's convolution
            xs, gs = (x.contiguous(), grad.contiguous()) if ctx.contiguous else (x, grad)
            ones, pads = [1] * d, [k // 2] * d
            grad_x = torch.ops.aten.convolution_backward(
                gs, xs, weight, None, ones, pads, ones, False, [0] * d, 1, [True, False, False]
            )[0]
        if needs[2]:
            grad_bias = grad.sum(dim=(0, *range(2, 2 + d)))
        if needs[3]:
            x_last = x.movedim(1, -1).contiguous()  # (B, *S, cin): no copy when channels-last
            grad_last = grad.movedim(1, -1).contiguous()  # (B, *S, cout)
            dfac = torch.empty_like(factors)
            pointers = [native.pointer(t) for t in (factors, x_last, grad_last, dfac)]
            sizes = native.c_sizes(tuple(x.shape[2:]))
            args = (*pointers, cout * cin, cin, cout, d, k, sizes, x.shape[0])
            # a block's work is ~4 times its expansion's (the correlation, then the same reduction)
            backward = native.function("separable_conv_backward", factors.dtype)
            native.run_chunked(backward, cout * -(-cin // native.BLOCK), 4 * native.BLOCK, *args)
        return grad_x, None, grad_bias, dfac


def fused_gradient_conv(x: Tensor, factors: Tensor, bias: Tensor | None, contiguous: bool = False) -> Tensor:
    """'Same' convolution of x (B, cin, *S) with the weight given by separable factors (d, k, 2, 2, cout,
    cin) (medexp.nn.fast.generate), in x's memory layout or (contiguous) the contiguous one; differentiable
    in x, bias and the factors, the factors' gradient formed without dL/dW. Callers check
    `native.available` and `fused_gradient_pays` first."""
    if not native.available(factors):
        raise RuntimeError("fused_gradient_conv needs medexp's C kernels (CPU, float32/float64)")
    d, _, _, cin = check_factors(factors)
    shape_ok = x.dim() == d + 2 and x.shape[1] == cin
    if not shape_ok or x.dtype != factors.dtype or x.device != factors.device:
        raise ValueError(
            f"fused_gradient_conv: input {tuple(x.shape)} {x.dtype} does not match factors "
            f"{tuple(factors.shape)} {factors.dtype}; expected (B, cin, *spatial) of the same dtype"
        )
    return _FusedGradientConv.apply(x, contiguous, bias, factors)
