"""A classic U-Net (Ronneberger et al. 2015; Cicek et al. 2016 in 3D), the backbone of the NeRD paper
(Zhang et al., channels 16-32-64-128-256) and of Nair et al.'s FFT model.

Per level: `convs_per_block` x (spatial conv -> norm -> activation), then dropout; down by 2x max-pooling; up
by a 2x transposed convolution, concatenation with the encoder output of the same level, and another conv
block. The spatial convolutions come from the kernel factory, so the conventional / Gabor / mixed choice
applies here as in WongNet; the final layer is the configured head (plain 1x1 conv, NeRDc or NeRDm).

Nair et al.'s U-Net (Sec. IV-A, IV-C) is `activation="elu", norm="none", dropout=[0.1, 0.1, 0.2, 0.2, 0.2],
dropout_mode="element"`: eLU after every convolution, no normalisation named, and dropout in every block,
0.1 in blocks c1, c2, c8, c9 and 0.2 in c3-c7 (c1-c4 the contracting blocks, c5 the bottleneck, c6-c9 the
expanding ones, i.e. levels 0, 1, 2, 3, 4, 3, 2, 1, 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medexp.nn.heads import PlainHead
from medexp.nn.kernels import ConventionalKernels, KernelFactory
from medexp.nn.wong import dropout_nd, make_input_layer

NORMS = ("group", "batch", "instance", "none")
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "elu": lambda: nn.ELU(inplace=True)}
DROPOUT_MODES = ("channel", "element")
GROUPS = 4  # GroupNorm groups, as in WongNet


def norm_nd(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    """GroupNorm(4), BatchNorm, InstanceNorm (affine) or nothing for `channels` channels."""
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(GROUPS if channels % GROUPS == 0 else 1, channels)
    if kind == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    raise ValueError(f"UNet norm must be one of {', '.join(NORMS)}, got {kind!r}")


def dropout_layer(mode: str, spatial_dims: int, p: float) -> nn.Module:
    """Dropout of whole channels ("channel": Dropout2d/3d, as in WongNet) or of single activations
    ("element": nn.Dropout, the Keras Dropout of Nair et al.)."""
    if mode == "element":
        return nn.Dropout(p)
    if mode == "channel":
        return dropout_nd(spatial_dims, p)
    raise ValueError(f"UNet dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {mode!r}")


class ConvBlock(nn.Sequential):
    """`num_convs` x (spatial conv from the kernel factory -> norm -> activation), then optional dropout."""

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
        activation: str = "relu",
        dropout_mode: str = "channel",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"UNet activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        for i in range(num_convs):
            cin = in_channels if i == 0 else out_channels
            layers += [
                kernel(cin, out_channels, level=level, spatial_dims=spatial_dims),
                norm_nd(norm, out_channels, spatial_dims),
                ACTIVATIONS[activation](),
            ]
        if dropout > 0:
            layers.append(dropout_layer(dropout_mode, spatial_dims, dropout))
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
        dropout: dropout rate after every block (0 = off), or one rate per level (shallowest first; the
            encoder and decoder blocks of a level share it, the last level is the bottleneck).
        input_layer: builds the input stage from (in_channels, spatial_dims), as for WongNet; None for none.
        norm: "group" (GroupNorm(4), batch-size independent, the default), "batch", "instance" or "none".
        activation: "relu" (default) or "elu" (Nair et al.).
        dropout_mode: "channel" (spatial dropout of whole channels, default) or "element" (Nair et al.).
        pad_to_fit: zero-pad inputs whose sizes are not multiples of 2^(len(channels) - 1) and crop the
            features back before the head (NeRD's 290x240 LA crops); False refuses them.

    Input (B, in_channels, *spatial) with every spatial size divisible by 2^(len(channels) - 1) (any size
    with pad_to_fit); output logits (B, num_classes, *spatial).
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
        dropout: float | Sequence[float] = 0.0,
        input_layer: Callable[..., nn.Module] | None = None,
        norm: str = "group",
        activation: str = "relu",
        dropout_mode: str = "channel",
        pad_to_fit: bool = False,
    ) -> None:
        super().__init__()
        self.pad_to_fit = bool(pad_to_fit)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2 or convs_per_block < 1:
            raise ValueError(
                f"UNet needs >= 2 levels and >= 1 conv per block, got {channels}, {convs_per_block}"
            )
        kernel = kernel or ConventionalKernels()
        head = head or PlainHead
        self.in_channels, self.spatial_dims, self.levels = in_channels, spatial_dims, len(channels)
        self.input_layer = make_input_layer(input_layer, in_channels, spatial_dims)
        rates = [float(dropout)] * len(channels) if isinstance(dropout, (int, float)) else list(dropout)
        if len(rates) != len(channels) or not all(0.0 <= r < 1.0 for r in rates):
            raise ValueError(
                f"UNet dropout must be a rate in [0, 1) or one per level ({len(channels)}), got {dropout}"
            )
        block = dict(
            kernel=kernel,
            spatial_dims=spatial_dims,
            norm=norm,
            activation=activation,
            dropout_mode=dropout_mode,
        )
        encoder_in = [in_channels, *channels[:-1]]
        self.encoder = nn.ModuleList(
            ConvBlock(cin, cout, convs_per_block, level=i, dropout=rates[i], **block)
            for i, (cin, cout) in enumerate(zip(encoder_in, channels, strict=True))
        )
        up_conv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        # up[i]: level i+1 -> level i resolution and width; decoder[i] sees up ++ skip = 2 * channels[i].
        self.up = nn.ModuleList(
            up_conv(channels[i + 1], channels[i], kernel_size=2, stride=2) for i in range(self.levels - 1)
        )
        self.decoder = nn.ModuleList(
            ConvBlock(2 * channels[i], channels[i], convs_per_block, level=i, dropout=rates[i], **block)
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
        missing = [-s % factor for s in x.shape[2:]]  # voxels short of a multiple of `factor`, per axis
        if any(missing) and not self.pad_to_fit:
            raise ValueError(
                f"UNet needs spatial sizes divisible by {factor}, got input shape {tuple(x.shape)} "
                "(pad_to_fit=True pads the input instead)"
            )
        x = self.input_layer(x)
        if any(missing):  # zero-pad both sides of each axis (F.pad lists the last axis first)
            x = F.pad(x, [n for m in reversed(missing) for n in (m // 2, m - m // 2)])
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)  # level i: (B, channels[i], *spatial / 2^i)
        for i in reversed(range(self.levels - 1)):
            # (B, channels[i], *spatial / 2^i) ++ skip -> (B, 2 channels[i], *spatial / 2^i)
            x = self.decoder[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        if any(missing):  # back to the input's size before the head (NeRD heads see the image's own borders)
            x = x[(..., *(slice(m // 2, x.shape[2 + d] - (m - m // 2)) for d, m in enumerate(missing)))]
        return self.head(x)  # (B, num_classes, *spatial)
