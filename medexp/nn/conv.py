"""The kernel factory: which spatial convolution a network level gets (DESIGN 3-4).

A network asks the factory for each spatial convolution by level; the `kernel` config group chooses what
comes back: conventional kernels everywhere, Gabor-based kernels everywhere, or the paper's mixed model
(conventional kernels at the low-channel levels 0 and 1, the "red blocks" of Wong & Moradi Fig. 2, Gabor
kernels elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

KINDS = ("conventional", "gabor", "mixed")


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv2d or nn.Conv3d for the given number of spatial dimensions."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


class KernelFactory:
    """Builds 'same'-padded spatial convolutions for a network level.

    Args:
        kind: "conventional", "gabor" or "mixed".
        conv_size: size of conventional kernels (3 in the paper; 5 for its V-Net comparison).
        gabor_size: size of Gabor-based kernels (7 in the paper).
        conventional_levels: levels that keep conventional kernels when kind is "mixed".
        impl: how Gabor convolutions are computed ("auto", "direct" or "fft").
    """

    def __init__(
        self,
        kind: str = "conventional",
        conv_size: int = 3,
        gabor_size: int = 7,
        conventional_levels: Sequence[int] = (0, 1),
        impl: str = "auto",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kernel kind must be one of {', '.join(KINDS)}, got {kind!r}")
        for name, size in (("conv_size", conv_size), ("gabor_size", gabor_size)):
            if size < 1 or size % 2 == 0:
                raise ValueError(f"kernel.{name} must be a positive odd integer, got {size}")
        self.kind = kind
        self.conv_size = int(conv_size)
        self.gabor_size = int(gabor_size)
        self.conventional_levels = tuple(int(level) for level in conventional_levels)
        self.impl = impl

    def kind_at(self, level: int) -> str:
        """The kernel kind ("conventional" or "gabor") used at a network level."""
        if self.kind == "mixed":
            return "conventional" if level in self.conventional_levels else "gabor"
        return self.kind

    def __call__(
        self, in_channels: int, out_channels: int, *, level: int, spatial_dims: int = 3
    ) -> nn.Module:
        """A spatial convolution (with bias) that keeps the spatial size."""
        if self.kind_at(level) == "conventional":
            return conv_nd(spatial_dims)(
                in_channels, out_channels, self.conv_size, padding=self.conv_size // 2, bias=True
            )
        from medexp.nn.gabor import GaborConv2d, GaborConv3d

        gabor_cls = GaborConv3d if spatial_dims == 3 else GaborConv2d
        return gabor_cls(in_channels, out_channels, kernel_size=self.gabor_size, bias=True, impl=self.impl)

    def __repr__(self) -> str:
        return f"KernelFactory(kind={self.kind!r}, conv_size={self.conv_size}, gabor_size={self.gabor_size})"
