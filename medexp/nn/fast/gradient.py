"""The direct convolution with a Gabor weight whose parameters' gradient never materialises dL/dW.

Why: on the deepest levels of the network (4^3-8^3 voxels, up to 192 -> 192 channels) every number of
the k^d weight gradient dL/dW is a short sum (a few dozen products per sample), yet oneDNN writes all of
them (50 MB for 192 x 192 x 7^3), PyTorch copies them between memory layouts and the generation's backward
reads them back. The Gabor layer needs dL/dW only contracted with the derivatives of its taps (eq. 2
through the separable factors of medexp.nn.fast.generate), so per block of 16 channel pairs the C kernel
(csrc/separable_impl.h gabor_conv_backward) correlates the input with the output gradient into a
k^d-tap tile in cache and reduces that tile onto the pair's numbers at once. The input gradient stays
with oneDNN. It pays only while those sums are short: `fused_gradient_pays`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medexp.nn.fast import native
from medexp.nn.fast.direct import direct_conv, weight_channels_last
from medexp.nn.fast.generate import c_params, dims, native_expand, native_rows_backward

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
    the forward's tensors, the parameters' gradient from x and the output gradient block by block."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, contiguous: bool, bias: Tensor | None, *params: Tensor) -> Tensor:
        d = dims(params)
        flat = c_params(params)
        weight, q, e = native_expand(flat, d, k, weight_channels_last(x, contiguous))
        ctx.save_for_backward(x, weight, *flat, q, e)
        ctx.k, ctx.d, ctx.contiguous = k, d, contiguous
        return direct_conv(x, weight, bias, contiguous)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, *flat, q, e = ctx.saved_tensors
        d, k, needs = ctx.d, ctx.k, ctx.needs_input_grad
        grad = grad.to(x.dtype)  # the C kernels read x's type (a backward run under autocast may differ)
        grad_x = grad_bias = None
        if needs[0]:  # the input gradient by oneDNN, with the tensors of the forward's convolution
            xs, gs = (x.contiguous(), grad.contiguous()) if ctx.contiguous else (x, grad)
            ones, pads = [1] * d, [k // 2] * d
            grad_x = torch.ops.aten.convolution_backward(
                gs, xs, weight, None, ones, pads, ones, False, [0] * d, 1, [True, False, False]
            )[0]
        if needs[3]:
            grad_bias = grad.sum(dim=(0, *range(2, 2 + d)))
        param_grads = [None] * (len(needs) - 4)
        if any(needs[4:]):
            (cout, cin), pairs = flat[0].shape, flat[0].numel()
            x_last = x.movedim(1, -1).contiguous()  # (B, *S, cin): no copy when channels-last
            grad_last = grad.movedim(1, -1).contiguous()  # (B, *S, cout)
            dq = torch.empty_like(q)
            pointers = [native.pointer(t) for t in (q, e, x_last, grad_last, dq)]
            sizes = native.c_sizes(tuple(x.shape[2:]))
            args = (*pointers, *native.longs(pairs, cin, cout), d, k, sizes, *native.longs(x.shape[0]))
            # a block's work is ~4 times its expansion's (the correlation, then the same reduction)
            backward = native.function("gabor_conv_backward", q.dtype)
            native.run_chunked(backward, cout * -(-cin // native.BLOCK), 4 * native.BLOCK, *args)
            param_grads = native_rows_backward(flat, dq, d)
        return grad_x, None, None, grad_bias, *param_grads


def fused_gradient_conv(
    x: Tensor, params: tuple[Tensor, ...], k: int, bias: Tensor | None, contiguous: bool = False
) -> Tensor:
    """'Same' convolution of x (B, cin, *S) with the Gabor weight of eq. 2 (`gabor_kernel3d`'s parameter
    order, k taps per axis), in x's memory layout or (contiguous) the contiguous one; differentiable in x,
    bias and every parameter, the parameters' gradient formed without dL/dW. Callers check
    `native.available` and `fused_gradient_pays` first."""
    sigma = params[0]
    if not native.available(sigma):
        raise RuntimeError("fused_gradient_conv needs medexp's C kernels (CPU, float32/float64)")
    shape_ok = x.dim() == dims(params) + 2 and x.shape[1] == sigma.shape[1]
    if not shape_ok or x.dtype != sigma.dtype or x.device != sigma.device or k < 1 or k % 2 == 0:
        raise ValueError(
            f"fused_gradient_conv: input {tuple(x.shape)} {x.dtype} and kernel size {k} do not match "
            f"parameters {tuple(sigma.shape)} {sigma.dtype}; expected (B, cin, *spatial) of the same "
            "dtype, odd k"
        )
    return _FusedGradientConv.apply(x, k, contiguous, bias, *params)
