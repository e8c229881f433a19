"""A classic U-Net (Ronneberger et al. 2015; Cicek et al. 2016 in 3D), the backbone of the NeRD paper
(Zhang et al., channels 16-32-64-128-256) and of Nair et al.'s FFT model.

Per level: `convs_per_block` x (spatial conv -> norm -> ReLU); down by 2x max-pooling; up by a 2x transposed
convolution, concatenation with the encoder output of the same level, and another conv block. The spatial
convolutions come from the kernel factory, so the conventional / Gabor / mixed choice applies here as in
WongNet; the final layer is the configured head (plain 1x1 conv, NeRDc or NeRDm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from medexp.nn.conv import KernelFactory
from medexp.nn.heads import PlainHead
from medexp.nn.wong import _make_input_layer, dropout_nd

NORMS = ("group", "batch", "instance")
GROUPS = 4  # GroupNorm groups, as in WongNet


def norm_nd(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    """GroupNorm(4), BatchNorm or InstanceNorm (affine) for `channels` channels."""
    if kind == "group":
        return nn.GroupNorm(GROUPS if channels % GROUPS == 0 else 1, channels)
    if kind == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    raise ValueError(f"UNet norm must be one of {', '.join(NORMS)}, got {kind!r}")


class ConvBlock(nn.Sequential):
    """`num_convs` x (spatial conv from the kernel factory -> norm -> ReLU), then optional spatial dropout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int,
        *,
        level: int,
        kernel: KernelFactory,
        spatial_dims: int,
        norm: str,
        dropout: float,
    ) -> None:
        layers: list[nn.Module] = []
        for i in range(num_convs):
            cin = in_channels if i == 0 else out_channels
            layers += [
                kernel(cin, out_channels, level=level, spatial_dims=spatial_dims),
                norm_nd(norm, out_channels, spatial_dims),
                nn.ReLU(inplace=True),
            ]
        if dropout > 0:
            layers.append(dropout_nd(spatial_dims, dropout))
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net with pluggable spatial kernels, head and input stage; 2D or 3D.

    Args:
        in_channels: image channels.
        num_classes: output channels K (labels including background).
        kernel: the kernel factory (conventional, Gabor or mixed); level i's convs use `level=i`.
        head: builds the final layer from (in_channels=channels[0], num_classes, spatial_dims); default plain.
        spatial_dims: 2 or 3.
        channels: widths per level, shallowest first; len(channels) levels, len - 1 poolings.
        convs_per_block: spatial convs per encoder/decoder block (2 in the classic U-Net).
        dropout: spatial dropout after every block (0 = off).
        input_layer: None, or "fft" for the FFT input stage of Nair et al. (shared with WongNet).
        norm: "group" (GroupNorm(4), batch-size independent, the default), "batch" or "instance".

    Input (B, in_channels, *spatial) with every spatial size divisible by 2^(len(channels) - 1); output
    logits (B, num_classes, *spatial).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        kernel: KernelFactory | None = None,
        head: Callable[..., nn.Module] | None = None,
        spatial_dims: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        convs_per_block: int = 2,
        dropout: float = 0.0,
        input_layer: str | None = None,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2 or convs_per_block < 1:
            raise ValueError(
                f"UNet needs >= 2 levels and >= 1 conv per block, got {channels}, {convs_per_block}"
            )
        kernel = kernel or KernelFactory()
        head = head or PlainHead
        self.in_channels, self.spatial_dims, self.levels = in_channels, spatial_dims, len(channels)
        self.input_layer = _make_input_layer(input_layer, in_channels, spatial_dims)
        block = dict(kernel=kernel, spatial_dims=spatial_dims, norm=norm, dropout=dropout)
        encoder_in = [in_channels, *channels[:-1]]
        self.encoder = nn.ModuleList(
            ConvBlock(cin, cout, convs_per_block, level=i, **block)
            for i, (cin, cout) in enumerate(zip(encoder_in, channels, strict=True))
        )
        up_conv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        # up[i]: level i+1 -> level i resolution and width; decoder[i] sees up ++ skip = 2 * channels[i].
        self.up = nn.ModuleList(
            up_conv(channels[i + 1], channels[i], kernel_size=2, stride=2) for i in range(self.levels - 1)
        )
        self.decoder = nn.ModuleList(
            ConvBlock(2 * channels[i], channels[i], convs_per_block, level=i, **block)
            for i in range(self.levels - 1)
        )
        self.pool = nn.MaxPool3d(2) if spatial_dims == 3 else nn.MaxPool2d(2)
        self.head = head(in_channels=channels[0], num_classes=num_classes, spatial_dims=spatial_dims)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *spatial) -> (B, num_classes, *spatial) logits."""
        factor = 2 ** (self.levels - 1)
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects input (B, {self.in_channels}, *spatial) with {self.spatial_dims} spatial "
                f"dims, got shape {tuple(x.shape)}"
            )
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"UNet needs spatial sizes divisible by {factor}, got input shape {tuple(x.shape)}"
            )
        if self.input_layer is not None:
            x = self.input_layer(x)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)  # level i: (B, channels[i], *spatial / 2^i)
        for i in reversed(range(self.levels - 1)):
            # (B, channels[i], *spatial / 2^i) ++ skip -> (B, 2 channels[i], *spatial / 2^i)
            x = self.decoder[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)  # (B, num_classes, *spatial)
