"""Kernel factories: which spatial convolution each level of a network gets (docs/design.md §3-4).

A network asks its factory for every spatial convolution by level; the `kernel` config group picks the
factory class by `_target_`: conventional kernels everywhere, Gabor-based kernels everywhere, or the
paper's mixed model (conventional kernels at the low-channel levels 0 and 1, the "red blocks" of Wong &
Moradi Fig. 2, Gabor kernels elsewhere). All three take the same size settings, so one sweep over
`kernel=conventional,gabor,mixed` can set them once.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medexp.nn.gabor import GaborConv2d, GaborConv3d


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv2d or nn.Conv3d for the given number of spatial dimensions."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


class KernelFactory:
    """Builds 'same'-padded spatial convolutions (with bias) for a network level.

    Subclasses say which kind of kernel a level gets (`kind_at`); this class builds it.

    Args:
        conv_size: size of conventional kernels (3 in the paper; 5 for its V-Net comparison).
        gabor_size: size of Gabor-based kernels (7 in the paper).
        impl: how Gabor convolutions are computed (medexp.nn.fast.IMPLS; "auto" picks the fastest).
    """

    kind = "conventional"

    def __init__(self, conv_size: int = 3, gabor_size: int = 7, impl: str = "auto") -> None:
        for name, size in (("conv_size", conv_size), ("gabor_size", gabor_size)):
            if size < 1 or size % 2 == 0:
                raise ValueError(f"kernel.{name} must be a positive odd integer, got {size}")
        self.conv_size, self.gabor_size, self.impl = int(conv_size), int(gabor_size), impl

    def kind_at(self, level: int) -> str:
        """The kernel kind ("conventional" or "gabor") used at a network level."""
        return self.kind

    def __call__(
        self, in_channels: int, out_channels: int, *, level: int, spatial_dims: int = 3
    ) -> nn.Module:
        """A spatial convolution (with bias) that keeps the spatial size."""
        if self.kind_at(level) == "conventional":
            size = self.conv_size
            return conv_nd(spatial_dims)(in_channels, out_channels, size, padding=size // 2, bias=True)
        gabor = GaborConv3d if spatial_dims == 3 else GaborConv2d
        return gabor(in_channels, out_channels, kernel_size=self.gabor_size, bias=True, impl=self.impl)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(conv_size={self.conv_size}, gabor_size={self.gabor_size})"


class ConventionalKernels(KernelFactory):
    """Conventional (fully trainable) kernels everywhere: the paper's 4.99M-parameter model at size 3."""

    kind = "conventional"


class GaborKernels(KernelFactory):
    """Fully trainable Gabor-based kernels (eq. 2) in every spatial convolution: 1.53M parameters."""

    kind = "gabor"


class MixedKernels(KernelFactory):
    """The paper's mixed model: conventional kernels at `conventional_levels` (levels 0 and 1, the red
    blocks of Fig. 2), Gabor kernels at every other level; 1.60M parameters at conv_size 3."""

    kind = "mixed"

    def __init__(
        self,
        conv_size: int = 3,
        gabor_size: int = 7,
        impl: str = "auto",
        conventional_levels: Sequence[int] = (0, 1),
    ) -> None:
        super().__init__(conv_size, gabor_size, impl)
        self.conventional_levels = tuple(int(level) for level in conventional_levels)

    def kind_at(self, level: int) -> str:
        return "conventional" if level in self.conventional_levels else "gabor"
