"""The network of Wong & Moradi (MLMI 2022, Fig. 2), written by hand: no library ships it.

A 5-level V-Net-like encoder-decoder with residual blocks, GroupNorm(4), spatial dropout and deep
supervision. Channel widths, block depths and the deep-supervision head are chosen so that the paper's
five parameter counts come out exactly (docs/design.md §4): conventional 3^3 = 4,989,812; Gabor = 1,528,544;
mixed 3^3 = 1,597,172; conventional 5^3 = 22,842,668; mixed 5^3 = 1,951,148.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medexp.nn.heads import PlainHead
from medexp.nn.kernels import ConventionalKernels, KernelFactory, conv_nd

CHANNELS = (12, 24, 48, 96, 192)
CONVS_PER_LEVEL = (1, 2, 3, 3, 3)
GROUPS = 4


def dropout_nd(spatial_dims: int, p: float) -> nn.Module:
    """Spatial dropout (whole channels), as in Tompson et al."""
    return nn.Dropout3d(p) if spatial_dims == 3 else nn.Dropout2d(p)


class ConvNormAct(nn.Sequential):
    """conv (bias) -> GroupNorm(4) -> ReLU."""

    def __init__(self, conv: nn.Module, out_channels: int) -> None:
        super().__init__(conv, nn.GroupNorm(GROUPS, out_channels), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """n spatial convolutions plus a residual 1x1 branch (conv -> GN(4) -> ReLU), then spatial dropout.

    out = dropout(convs(x) + residual(x)); all convs keep the spatial size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int,
        *,
        level: int,
        kernel: KernelFactory,
        spatial_dims: int,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_convs
        self.convs = nn.Sequential(
            *[
                ConvNormAct(kernel(cin, cout, level=level, spatial_dims=spatial_dims), cout)
                for cin, cout in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.residual = ConvNormAct(
            conv_nd(spatial_dims)(in_channels, out_channels, 1, bias=True), out_channels
        )
        self.dropout = dropout_nd(spatial_dims, dropout)
        self.kernel_kind = kernel.kind_at(level)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.convs(x) + self.residual(x))


class WongNet(nn.Module):
    """Encoder-decoder of Wong & Moradi with deep supervision and a pluggable head.

    Args:
        in_channels: image channels (1 for T1 MRI).
        num_classes: labels including background (20 in the paper).
        kernel: the kernel factory (conventional, Gabor or mixed).
        head: builds the final layer from (in_channels, num_classes, spatial_dims); default plain 1x1 conv.
        spatial_dims: 3 (the paper) or 2.
        dropout: spatial dropout probability after every block.
        input_layer: builds a stage applied to the image first, from (in_channels, spatial_dims), e.g. the
            FFT input stage of Nair et al. (medexp.nn.fft.FFTInput); None for none.

    Input (B, in_channels, *spatial) with every spatial size divisible by 16; output logits
    (B, num_classes, *spatial). Softmax of the logits gives the paper's scores.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 20,
        kernel: KernelFactory | None = None,
        head: Callable[..., nn.Module] | None = None,
        spatial_dims: int = 3,
        dropout: float = 0.1,
        input_layer: Callable[..., nn.Module] | None = None,
        channels: Sequence[int] = CHANNELS,
        convs_per_level: Sequence[int] = CONVS_PER_LEVEL,
    ) -> None:
        super().__init__()
        kernel = kernel or ConventionalKernels()
        head = head or PlainHead
        self.spatial_dims = spatial_dims
        self.levels = len(channels)
        self.input_layer = make_input_layer(input_layer, in_channels, spatial_dims)
        block = dict(kernel=kernel, spatial_dims=spatial_dims, dropout=dropout)
        encoder_in = [in_channels, *channels[:-1]]
        self.encoder = nn.ModuleList(
            ResidualBlock(cin, cout, n, level=i, **block)
            for i, (cin, cout, n) in enumerate(zip(encoder_in, channels, convs_per_level, strict=True))
        )
        # Decoder level i sees upsample(level i+1 output) ++ encoder skip: channels[i+1] + channels[i].
        self.decoder = nn.ModuleList(
            ResidualBlock(channels[i + 1] + channels[i], channels[i], convs_per_level[i], level=i, **block)
            for i in range(self.levels - 1)
        )
        self.pool = nn.MaxPool3d(2) if spatial_dims == 3 else nn.MaxPool2d(2)
        self.head = head(in_channels=sum(channels[:-1]), num_classes=num_classes, spatial_dims=spatial_dims)

    def _upsample(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """(B, C, *s) -> (B, C, *size) by (tri/bi)linear interpolation; x itself when already that size."""
        if tuple(x.shape[2:]) == tuple(size):
            return x
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        factor = 2 ** (self.levels - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"WongNet needs spatial sizes divisible by {factor}, got input shape {tuple(x.shape)}"
            )
        x = self.input_layer(x)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)  # level i: (B, channels[i], *spatial / 2^i)
        decoded = []
        for i in reversed(range(self.levels - 1)):
            skip = skips[i]
            x = self.decoder[i](torch.cat([self._upsample(x, skip.shape[2:]), skip], dim=1))
            decoded.append(x)
        full_size = skips[0].shape[2:]
        if type(self.head) is PlainHead:
            return self._plain_head_per_level(decoded, full_size)
        if hasattr(self.head, "forward_levels"):  # NeRD heads: the full-size features are never built
            return self.head.forward_levels(decoded, full_size)
        # Deep supervision: every decoder output at full size, concatenated -> (B, 96+48+24+12, *spatial)
        # with the paper's widths.
        features = torch.cat([self._upsample(d, full_size) for d in decoded], 1)
        return self.head(features)

    def _plain_head_per_level(self, decoded: list[Tensor], full_size: Sequence[int]) -> Tensor:
        """The plain head on the deep-supervision features, computed per decoder level before upsampling.

        W [up(d_3); up(d_2); up(d_1); d_0] + b = sum_l up(W_l d_l) + b, W_l the columns of the 1x1 weight
        that see level l: trilinear upsampling is linear and treats every channel alike, so it commutes
        with the 1x1 convolution (equal up to float rounding). The upsampling then moves K channels
        instead of 168, and the 180-channel full-size tensor is never built: about a third of the
        conventional model's training step at 64^3 (scripts/bench.py). Heads that are not a per-voxel
        linear map (NeRD) take the concatenated features.
        """
        conv = self.head.conv
        weights = conv.weight.split([d.shape[1] for d in decoded], dim=1)  # (K, C_l, 1, ..)
        logits = conv.bias.view(1, -1, *[1] * self.spatial_dims)  # (1, K, 1, ..)
        for level_features, weight in zip(decoded, weights, strict=True):
            level_logits = conv._conv_forward(level_features, weight, None)  # (B, K, *spatial / 2^l)
            logits = logits + self._upsample(level_logits, full_size)
        return logits  # (B, K, *spatial)


def make_input_layer(
    factory: Callable[..., nn.Module] | None, in_channels: int, spatial_dims: int
) -> nn.Module:
    """The input stage from its factory (the `input_layer` config group), or nn.Identity for none."""
    if factory is None:
        return nn.Identity()
    if not callable(factory):
        raise ValueError(f"input_layer must build a module from (in_channels, spatial_dims), got {factory!r}")
    return factory(in_channels=in_channels, spatial_dims=spatial_dims)
