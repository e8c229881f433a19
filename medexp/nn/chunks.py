"""Per-position computations over slabs of positions, keeping no slab's intermediates for backward.

A NeRD head (medexp.nn.heads) computes, at every position, values much wider than its scores: (K, J) per
position for NeRDc, several C-vectors for NeRDm. `slab_scores` evaluates such a function slab by slab
along the first spatial axis: the forward runs without autograd and keeps only its inputs; the backward
recomputes one slab at a time with autograd and writes each input's gradient region by region (activation
checkpointing per slab). It is an autograd Function rather than torch.utils.checkpoint per slab because
per-slab checkpoints would each hand autograd a full-size zero-padded gradient of their slice to sum.

The inputs are either the features themselves (slab [a, b) reads rows [a, b)) or the decoder outputs of a
network's deep supervision at their own resolutions (`Upsampled`): then the full-size concatenation of their
upsampled copies, the largest tensor of the head, is never built, and each slab upsamples the few rows of
every level it reads. That is exact: with integer power-of-two factors and align_corners=False, linear
interpolation of a block of rows with an explicit scale factor maps every output row to the same source
positions and weights as the interpolation of the whole tensor.

Results equal the direct computation's to float rounding: the same products, with the parameters'
gradients summed slab by slab (and a matmul library free to block a slab's products differently).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# ScoresOf(features slab (B, C, b - a, *rest), a, b) -> scores slab (B, K, b - a, *rest)
ScoresOf = Callable[[Tensor, int, int], Tensor]


class Rows:
    """Inputs that are the features: slab [a, b) reads rows [a, b) of the one input."""

    def rows(self, index: int, start: int, stop: int) -> tuple[int, int]:
        return start, stop

    def features(self, parts: Sequence[Tensor], start: int, stop: int) -> Tensor:
        return parts[0]  # (B, C, b - a, *rest)


class Upsampled:
    """Inputs that are deep-supervision levels: the features are cat([upsample(level) for level], dim=1),
    each level upsampled to `size` by (bi/tri)linear interpolation, align_corners=False (a level of that
    size as it is), as medexp.nn.wong.WongNet builds them.

    `exact(levels, size)` tells whether the row-wise evaluation is exact: every level's factor per axis is
    an integer power of two.
    """

    def __init__(self, levels: Sequence[Tensor], size: Sequence[int]) -> None:
        self.size = tuple(int(s) for s in size)
        self.factors = [tuple(n // m for n, m in zip(self.size, lv.shape[2:], strict=True)) for lv in levels]
        self.mode = "trilinear" if len(self.size) == 3 else "bilinear"

    @staticmethod
    def exact(levels: Sequence[Tensor], size: Sequence[int]) -> bool:
        for level in levels:
            for n, m in zip(size, level.shape[2:], strict=True):
                f = n // m
                if n % m or f & (f - 1):
                    return False
        return True

    def rows(self, index: int, start: int, stop: int) -> tuple[int, int]:
        """Rows of level `index` that output rows [start, stop) read: output row d is interpolated from
        input rows floor((d + 0.5) / f - 0.5) and the one after (clamped), and one row more on each side
        keeps the block's own border clamping away from the rows used."""
        f = self.factors[index][0]
        if f == 1:
            return start, stop
        return max(0, start // f - 1), min(self.size[0] // f, (stop - 1) // f + 2)

    def features(self, parts: Sequence[Tensor], start: int, stop: int) -> Tensor:
        out = []
        for index, part in enumerate(parts):  # part: rows [lo, hi) of the level, (B, C_l, hi - lo, *rest_l)
            factors = self.factors[index]
            if all(f == 1 for f in factors):
                out.append(part)
                continue
            lo = self.rows(index, start, stop)[0]
            up = F.interpolate(
                part, scale_factor=factors, mode=self.mode, align_corners=False, recompute_scale_factor=False
            )  # (B, C_l, (hi - lo) * f, *size[1:])
            out.append(up[:, :, start - lo * factors[0] : stop - lo * factors[0]])
        return torch.cat(out, dim=1)  # (B, sum C_l, b - a, *size[1:])


def slab_ranges(first: int, bytes_per_row: int, budget: int | None) -> list[tuple[int, int]]:
    """[start, stop) ranges along an axis of `first` rows whose intermediates stay within `budget` bytes
    (one range when budget is None or everything fits)."""
    if budget is None or bytes_per_row * first <= budget:
        return [(0, first)]
    step = max(1, budget // max(bytes_per_row, 1))
    return [(a, min(a + step, first)) for a in range(0, first, step)]


def slab_scores(
    scores_of: ScoresOf, source, inputs: Sequence[Tensor], slabs: list, params: Sequence[nn.Parameter]
) -> Tensor:
    """cat over slabs [a, b) of scores_of(source.features(rows of inputs for the slab), a, b) along the
    first spatial axis, (B, K, *spatial); with autograd through `inputs` and `params` (the parameters
    scores_of uses) at the memory of one slab. Without autograd, the slabs in turn."""
    wants_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in inputs) or bool(params))
    if not wants_grad:
        return _forward(scores_of, source, inputs, slabs)
    return _SlabScores.apply(scores_of, source, slabs, len(inputs), *inputs, *params)


def _parts(source, inputs: Sequence[Tensor], start: int, stop: int) -> list[Tensor]:
    parts = []
    for index, t in enumerate(inputs):
        lo, hi = source.rows(index, start, stop)
        parts.append(t[:, :, lo:hi])
    return parts


def _forward(scores_of: ScoresOf, source, inputs: Sequence[Tensor], slabs: list) -> Tensor:
    pieces = [scores_of(source.features(_parts(source, inputs, a, b), a, b), a, b) for a, b in slabs]
    return torch.cat(pieces, dim=2)  # each (B, K, b - a, *rest) -> (B, K, *spatial)


def _autocast(device_type: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast state in force now on `device_type`, to re-enter it later."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext
    enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type, dtype=dtype, enabled=enabled)


class _SlabScores(torch.autograd.Function):
    """slab_scores with autograd: forward without it, saving only the inputs; backward slab by slab under
    the forward's autocast state, returning the inputs' and the parameters' gradients."""

    @staticmethod
    def forward(ctx, scores_of, source, slabs, n_inputs, *tensors):
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        ctx.scores_of, ctx.source, ctx.slabs, ctx.n_params = scores_of, source, slabs, len(params)
        ctx.autocast = _autocast(inputs[0].device.type)
        ctx.params = params  # leaves: kept by their module anyway, not saved tensors
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return _forward(scores_of, source, inputs, slabs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        inputs = ctx.saved_tensors
        wants = list(ctx.needs_input_grad[4 : 4 + len(inputs)])
        grad_inputs = [torch.zeros_like(t) if w else None for t, w in zip(inputs, wants, strict=True)]
        params = [p for p in ctx.params if p.requires_grad]
        grad_params: list[Tensor | None] = [None] * len(params)
        for a, b in ctx.slabs:
            parts = _parts(ctx.source, inputs, a, b)
            parts = [p.detach().requires_grad_(w) for p, w in zip(parts, wants, strict=True)]
            with torch.enable_grad(), ctx.autocast():
                scores = ctx.scores_of(ctx.source.features(parts, a, b), a, b)
            leaves = [p for p, w in zip(parts, wants, strict=True) if w] + params
            grads = list(torch.autograd.grad(scores, leaves, grad_scores[:, :, a:b], allow_unused=True))
            for index, w in enumerate(wants):
                if w:
                    g = grads.pop(0)
                    if g is not None:
                        lo, hi = ctx.source.rows(index, a, b)
                        grad_inputs[index][:, :, lo:hi] += g
            for i, g in enumerate(grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        by_param = iter(grad_params)
        grad_all_params = [next(by_param) if p.requires_grad else None for p in ctx.params]
        return None, None, None, None, *grad_inputs, *grad_all_params


def rows_bytes(inputs_shape: Sequence[int], values_per_position: int, element_size: int) -> int:
    """Bytes of one row (index of the first spatial axis) of per-position intermediates."""
    batch, _, _, *rest = inputs_shape
    return batch * math.prod(rest) * values_per_position * element_size
