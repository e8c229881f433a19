"""Fully trainable Gabor-based convolutions (Wong & Moradi, MLMI 2022, eq. 2).

Every (out, in) channel pair owns a handful of scalars and its kernel is generated from them on every
forward pass, so the number of trainable parameters does not depend on the kernel size:

    G(x) = exp(-|x|^2 / (2 sigma^2)) * (a_re cos(2 pi f_re x' + psi) + a_im sin(2 pi f_im x' + psi))   (eq. 2)

x' is the first component of R x, R = Rx(theta_x) Ry(theta_y) Rz(theta_z) (theta_x drops out: the envelope
is isotropic); x, y, z are voxel offsets along the last (W), middle (H) and first (D) axes of the weight
(cout, cin, D, H, W) (docs/design.md §5).

This file is the definition: `gabor_kernel3d` / `gabor_kernel2d` evaluate eq. 2 as written, `weight()`
applies them to a layer's parameters, `reference(x)` convolves with that weight. Every other `impl` is
faster (medexp.nn.fast) and tested against `reference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medexp.nn import fast

SIGMA_MIN = 1e-2  # floor on the softplus-reparametrised sigma: keeps 1 / sigma^2 finite


def _offsets(size: int, like: Tensor) -> Tensor:
    """Integer offsets from the kernel centre, e.g. size 7 -> [-3, ..., 3], on like's device and dtype."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gabor kernel size must be a positive odd integer, got {size}")
    return torch.arange(-(size // 2), size // 2 + 1, device=like.device, dtype=like.dtype)


def _check_pair_params(params: tuple[Tensor, ...]) -> None:
    shapes = [tuple(p.shape) for p in params]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"Gabor parameters must all be (cout, cin) tensors of one shape, got {shapes}")


def gabor_kernel3d(sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi, size: int) -> Tensor:
    """3D Gabor-based kernels of eq. 2, one per (out, in) channel pair:

        G = exp(-|x|^2 / (2 sigma^2)) (a_re cos(2 pi f_re x' + psi) + a_im sin(2 pi f_im x' + psi)),
        x' = cos(theta_y) cos(theta_z) x - cos(theta_y) sin(theta_z) y + sin(theta_y) z

    sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi: (cout, cin) tensors; sigma used as given
    (positive), angles in radians, frequencies in cycles per voxel. size: odd k, offsets -(k // 2)..k // 2.
    Returns (cout, cin, k, k, k) kernels; axis 2 is z (D), axis 3 is y (H), axis 4 is x (W).
    """
    params = (sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi)
    _check_pair_params(params)
    r = _offsets(size, sigma)
    x, y, z = r.view(1, 1, 1, 1, size), r.view(1, 1, 1, size, 1), r.view(1, 1, size, 1, 1)  # along W, H, D
    # every parameter (cout, cin) -> (cout, cin, 1, 1, 1), to broadcast against the offsets
    sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi = (t[..., None, None, None] for t in params)
    cos_y = torch.cos(theta_y)
    xp = cos_y * torch.cos(theta_z) * x - cos_y * torch.sin(theta_z) * y + torch.sin(theta_y) * z
    envelope = torch.exp(-(x * x + y * y + z * z) / (2 * sigma**2))  # (cout, cin, k, k, k)
    sinusoid = a_re * torch.cos(2 * math.pi * f_re * xp + psi) + a_im * torch.sin(
        2 * math.pi * f_im * xp + psi
    )
    return envelope * sinusoid


def gabor_kernel2d(sigma, theta, a_re, a_im, f_re, f_im, psi, size: int) -> Tensor:
    """2D variant of eq. 2, G(x, y) = exp(-(x^2 + y^2) / (2 sigma^2)) (a_re cos(2 pi f_re x' + psi) + a_im
    sin(2 pi f_im x' + psi)) with x' = x cos(theta) + y sin(theta): (cout, cin) tensors as `gabor_kernel3d`
    -> (cout, cin, k, k) kernels, axis 2 is y (H), axis 3 is x (W)."""
    params = (sigma, theta, a_re, a_im, f_re, f_im, psi)
    _check_pair_params(params)
    r = _offsets(size, sigma)
    x, y = r.view(1, 1, 1, size), r.view(1, 1, size, 1)  # along W, H
    # every parameter (cout, cin) -> (cout, cin, 1, 1), to broadcast against the offsets
    sigma, theta, a_re, a_im, f_re, f_im, psi = (t[..., None, None] for t in params)
    xp = x * torch.cos(theta) + y * torch.sin(theta)
    envelope = torch.exp(-(x * x + y * y) / (2 * sigma**2))  # (cout, cin, k, k)
    sinusoid = a_re * torch.cos(2 * math.pi * f_re * xp + psi) + a_im * torch.sin(
        2 * math.pi * f_im * xp + psi
    )
    return envelope * sinusoid


class _GaborConvNd(nn.Module):
    """Shared by GaborConv2d / GaborConv3d: parameters, initialisation, weight, convolution."""

    spatial_dims: int
    angle_names: tuple[str, ...]
    formula: Callable[..., Tensor]  # gabor_kernel3d / gabor_kernel2d: (*eq2_params(), size) -> weight

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 7, bias: bool = True, impl: str = "auto"
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Gabor kernel_size must be a positive odd integer, got {kernel_size}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.impl = int(kernel_size), fast.check_impl(impl)
        # sigma is stored through softplus (sigma = softplus(sigma_raw) + SIGMA_MIN), so it stays positive.
        self.param_names = ("sigma_raw", *self.angle_names, "a_re", "a_im", "f_re", "f_im", "psi")
        for name in self.param_names:
            self.register_parameter(name, nn.Parameter(torch.empty(self.out_channels, self.in_channels)))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.used_impl: str | None = None  # the implementation of the last forward pass (logged per run)
        self.reset_parameters()

    @property
    def sigma(self) -> Tensor:
        """The Gaussian width actually used, (cout, cin)."""
        return F.softplus(self.sigma_raw) + SIGMA_MIN

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation that trains (the paper leaves it open); the draws' order is part of the contract.

        Orientations uniform over directions (`_init_angles`); frequencies uniform in [0, 0.3] cycles/voxel
        (blobs to ~3-voxel periods, below the Nyquist limit 0.5); psi uniform; sigma uniform in [k/4, k/2]
        (the envelope fills most of the support without becoming a box). a_re, a_im ~ N(0, s^2) per pair
        with s^2 = 1 / (3 cin sum_x g(x)^2), so that E[sum G^2] (cos^2 and sin^2 average 1/2) equals that
        of nn.Conv{2,3}d's default weights (variance 1 / (3 fan_in)): mixed models start with matched
        activation scales. Bias as nn.Conv: uniform in +-1 / sqrt(cin k^d).
        """
        k = self.kernel_size
        sigma = torch.empty_like(self.sigma_raw).uniform_(k / 4, k / 2)
        self.sigma_raw.copy_(torch.log(torch.expm1(sigma - SIGMA_MIN)))  # inverse of softplus(.) + SIGMA_MIN
        self._init_angles()
        for f in (self.f_re, self.f_im):
            f.uniform_(0.0, 0.3)
        self.psi.uniform_(-math.pi, math.pi)
        r = _offsets(k, sigma)
        r2 = sum(t**2 for t in torch.meshgrid(*[r] * self.spatial_dims, indexing="ij"))  # (k,)*d, |x|^2
        # sum_x g(x)^2 = sum_x exp(-|x|^2 / sigma^2) per pair: (cout, cin, k^d) summed -> (cout, cin)
        energy = torch.exp(-r2.reshape(1, 1, -1) / sigma[..., None] ** 2).sum(-1)
        std = 1.0 / torch.sqrt(3.0 * self.in_channels * energy)
        for a in (self.a_re, self.a_im):
            a.copy_(torch.randn_like(a) * std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * k**self.spatial_dims)
            self.bias.uniform_(-bound, bound)

    def _init_angles(self) -> None:
        raise NotImplementedError

    def eq2_params(self) -> tuple[Tensor, ...]:
        """Eq. 2's (cout, cin) arguments as `formula` takes them: (sigma, *angles, a_re, .., psi)."""
        angles = [getattr(self, name) for name in self.angle_names]
        return (self.sigma, *angles, self.a_re, self.a_im, self.f_re, self.f_im, self.psi)

    def weight(self, size: int | None = None) -> Tensor:
        """The kernels of eq. 2, (cout, cin, k, ..., k); with `size`, only the central size^d taps."""
        return self.formula(*self.eq2_params(), size=self.kernel_size if size is None else size)

    def reference(self, x: Tensor) -> Tensor:
        """The definition of the layer, impl "reference": F.conv{2,3}d(x, weight(), bias, padding=k // 2)."""
        conv = F.conv3d if self.spatial_dims == 3 else F.conv2d
        return conv(x, self.weight(), self.bias, padding=self.kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """`reference(x)` (B, cin, *S) -> (B, cout, *S) up to float rounding, computed as `impl` says
        (medexp.nn.fast: "direct", "direct_contiguous", "fft", or "auto": the fastest, timed per shape)."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.in_channels}, *spatial) with "
                f"{self.spatial_dims} spatial dims, got shape {tuple(x.shape)}"
            )
        out, impl = fast.gabor_conv(self, x)
        if not torch.compiler.is_compiling():
            self.used_impl = impl  # what "auto" picked, for the run's record
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}, impl={self.impl!r}"
        )


class GaborConv3d(_GaborConvNd):
    """Drop-in for nn.Conv3d(cin, cout, k, padding=k // 2) with Gabor-based kernels (eq. 2): 8 parameters
    per (out, in) pair {sigma (as sigma_raw), theta_y, theta_z, a_re, a_im, f_re, f_im, psi}, each a (cout,
    cin) tensor, plus a bias per output channel. kernel_size: odd k (7 in the paper); impl: one of
    medexp.nn.fast.IMPLS."""

    spatial_dims = 3
    angle_names = ("theta_y", "theta_z")
    formula = staticmethod(gabor_kernel3d)

    def _init_angles(self) -> None:
        # x' = u . (x, y, z) with u = (cos ty cos tz, -cos ty sin tz, sin ty), a unit vector; sin(theta_y)
        # uniform in [-1, 1] and theta_z uniform in [-pi, pi) make u uniform on the sphere.
        self.theta_y.copy_(torch.asin(torch.empty_like(self.theta_y).uniform_(-1.0, 1.0)))
        self.theta_z.uniform_(-math.pi, math.pi)


class GaborConv2d(_GaborConvNd):
    """Drop-in for nn.Conv2d(cin, cout, k, padding=k // 2) with 2D Gabor-based kernels: 7 parameters per
    (out, in) pair {sigma, theta, a_re, a_im, f_re, f_im, psi}, plus a bias per output channel."""

    spatial_dims = 2
    angle_names = ("theta",)
    formula = staticmethod(gabor_kernel2d)

    def _init_angles(self) -> None:
        # x' = u . (x, y) with u = (cos theta, sin theta): theta uniform gives uniform directions.
        self.theta.uniform_(-math.pi, math.pi)
