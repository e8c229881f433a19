"""The direct 'same' convolution F.conv{2,3}d, and the memory layouts it runs in.

Why a module: oneDNN (PyTorch's CPU convolution) is fastest when input and weight share a memory layout,
so the Gabor weight is generated straight in the layout its convolution reads (medexp.nn.fast.generate
writes either), and neither the weight nor its gradient is copied between layouts. Two variants:

- "direct": the input's layout (channels-last activations, the trainer's default, get a channels-last
  weight and a channels-last result);
- "direct_contiguous": the contiguous layout whatever the input's, the result returned in the input's.
  On the deepest, smallest volumes oneDNN's channels-last 7^3 kernels are slower than its contiguous ones
  while the activations there are small, so converting them costs little (`scripts/bench.py`, layer
  table, level 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def format_of(x: Tensor) -> torch.memory_format:
    """channels-last when x is laid out channels-innermost (also for one channel), else contiguous."""
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return fmt if x.is_contiguous(memory_format=fmt) and x.stride(1) == 1 else torch.contiguous_format


def weight_channels_last(x: Tensor, contiguous: bool) -> bool:
    """Whether the direct convolution of x wants a channels-last weight: "direct" follows x's layout (a
    one-channel input is both, and oneDNN then runs its faster channels-last kernel), "direct_contiguous"
    never."""
    return not contiguous and (format_of(x) != torch.contiguous_format or x.shape[1] == 1)


def channels_last_weight(weight: Tensor) -> Tensor:
    """weight (cout, cin, *k) with channels-last strides (cin innermost), copied only if it has not; also
    for cin = 1, where .contiguous(memory_format=...) keeps the old strides."""
    if weight.stride(1) == 1:
        return weight
    d = weight.dim() - 2
    # (cout, cin, *k) -> (cout, *k, cin) made contiguous -> viewed back as (cout, cin, *k)
    return weight.permute(0, *range(2, 2 + d), 1).contiguous().permute(0, 1 + d, *range(1, 1 + d))


def direct_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, contiguous: bool = False) -> Tensor:
    """F.conv{2,3}d(x, weight, bias, padding=k // 2) in x's layout or (contiguous) the contiguous one;
    returned in x's layout either way."""
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    padding = [k // 2 for k in weight.shape[2:]]
    if contiguous:
        out = conv(x.contiguous(), weight.contiguous(), bias, padding=padding)
        return out.contiguous(memory_format=format_of(x))
    if weight_channels_last(x, contiguous=False):
        weight = channels_last_weight(weight)
    return conv(x, weight, bias, padding=padding)
