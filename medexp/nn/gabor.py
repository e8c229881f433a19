"""Fully trainable Gabor-based convolutions (Wong & Moradi, MLMI 2022, eq. 2), written by hand.

No library ships this layer (neither MONAI nor torchvision nor kornia has a Gabor convolution whose
parameters are all trained by backpropagation), so the kernel construction and the layers are written here.

Every (out, in) channel pair of a convolution owns a handful of scalars and its kernel is generated from
them on every forward pass, so the number of trainable parameters does not depend on the kernel size:

    G(x) = exp(-|x|^2 / (2 sigma^2)) * (a_re cos(2 pi f_re x' + psi) + a_im sin(2 pi f_im x' + psi))   (eq. 2)

3D: x' = cos(theta_y) cos(theta_z) x - cos(theta_y) sin(theta_z) y + sin(theta_y) z, the first component of
R x with R = Rx(theta_x) Ry(theta_y) Rz(theta_z) (theta_x drops out because the envelope is isotropic);
8 parameters per pair {sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi}.
2D: x' = x cos(theta) + y sin(theta); 7 parameters per pair {sigma, theta, a_re, a_im, f_re, f_im, psi}.

Axis convention (DESIGN 5): x, y, z are integer voxel offsets from the kernel centre along the last (W),
middle (H) and first (D) spatial axes of the weight tensor (cout, cin, D, H, W); in 2D x runs along W and
y along H of (cout, cin, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medexp.nn.fftconv import (
    IMPLS,
    Product,
    crop_to_reach,
    reach,
    resolve_impl,
    same_conv,
    spectral_conv,
    spectrum_product,
    weight_channels_last,
)
from medexp.nn.separable import (
    fused_gradient_pays,
    gabor_conv,
    gabor_spectral_product,
    gabor_spectrum,
    gabor_weight,
    native_available,
)

NAMES_3D = ("sigma", "theta_y", "theta_z", "a_re", "a_im", "f_re", "f_im", "psi")
NAMES_2D = ("sigma", "theta", "a_re", "a_im", "f_re", "f_im", "psi")
SIGMA_MIN = 1e-2  # floor on the softplus-reparametrised sigma: keeps 1 / sigma^2 finite
# Tiles (x batch) up to which the FFT path builds the kernel spectrum inside the channel product. The
# product's fwd+bwd (spectrum included), built inside / stored, `python scripts/bench.py --sections product`
# (README Performance; two runs): 1 tile 0.36-0.62, 2 and 4 tiles (48->48 at 16^3) 0.41-0.42 and 0.48-0.52;
# 8 tiles (24->24 at 28^3) 1.10-1.14, 27 (36->12 at 28^3) 1.58-1.60, 64 (72->24 at 14^3) 2.22-2.32.
FUSED_MAX_TILES = 4


def _offsets(size: int, like: Tensor) -> Tensor:
    """Integer offsets from the kernel centre, e.g. size 7 -> [-3, ..., 3], on like's device and dtype."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gabor kernel size must be a positive odd integer, got {size}")
    half = size // 2
    return torch.arange(-half, half + 1, device=like.device, dtype=like.dtype)


def _check_pair_params(params: dict[str, Tensor]) -> None:
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"Gabor parameters must all be (cout, cin) tensors of one shape, got {shapes}")


def _sinusoid(xp: Tensor, a_re, a_im, f_re, f_im, psi) -> Tensor:
    """a_re cos(2 pi f_re x' + psi) + a_im sin(2 pi f_im x' + psi): the sinusoidal factor of eq. 2."""
    return a_re * torch.cos(2 * math.pi * f_re * xp + psi) + a_im * torch.sin(2 * math.pi * f_im * xp + psi)


def gabor_kernel3d(
    sigma: Tensor,
    theta_y: Tensor,
    theta_z: Tensor,
    a_re: Tensor,
    a_im: Tensor,
    f_re: Tensor,
    f_im: Tensor,
    psi: Tensor,
    size: int,
) -> Tensor:
    """3D Gabor-based kernels of Wong & Moradi eq. 2, one per (out, in) channel pair.

    Args:
        sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi: (cout, cin) tensors; sigma is used as given
            (positive), angles in radians, frequencies in cycles per voxel.
        size: odd kernel size k; offsets run from -(k // 2) to k // 2 along every axis.

    Returns:
        (cout, cin, k, k, k) kernels; axis 2 is z (D), axis 3 is y (H), axis 4 is x (W).
    """
    params = dict(
        sigma=sigma, theta_y=theta_y, theta_z=theta_z, a_re=a_re, a_im=a_im, f_re=f_re, f_im=f_im, psi=psi
    )
    _check_pair_params(params)
    r = _offsets(size, sigma)
    x = r.view(1, 1, 1, 1, size)  # along W
    y = r.view(1, 1, 1, size, 1)  # along H
    z = r.view(1, 1, size, 1, 1)  # along D
    # Every parameter (cout, cin) -> (cout, cin, 1, 1, 1) so it broadcasts against the offset grid.
    p = {name: t[..., None, None, None] for name, t in params.items()}
    cos_y = torch.cos(p["theta_y"])
    xp = (
        cos_y * torch.cos(p["theta_z"]) * x
        - cos_y * torch.sin(p["theta_z"]) * y
        + torch.sin(p["theta_y"]) * z
    )
    envelope = torch.exp(-(x * x + y * y + z * z) / (2 * p["sigma"] ** 2))  # (cout, cin, k, k, k)
    return envelope * _sinusoid(xp, p["a_re"], p["a_im"], p["f_re"], p["f_im"], p["psi"])


def gabor_kernel2d(
    sigma: Tensor,
    theta: Tensor,
    a_re: Tensor,
    a_im: Tensor,
    f_re: Tensor,
    f_im: Tensor,
    psi: Tensor,
    size: int,
) -> Tensor:
    """2D variant of eq. 2 with x' = x cos(theta) + y sin(theta).

    Args:
        sigma, theta, a_re, a_im, f_re, f_im, psi: (cout, cin) tensors, as in `gabor_kernel3d`.
        size: odd kernel size k.

    Returns:
        (cout, cin, k, k) kernels; axis 2 is y (H), axis 3 is x (W).
    """
    params = dict(sigma=sigma, theta=theta, a_re=a_re, a_im=a_im, f_re=f_re, f_im=f_im, psi=psi)
    _check_pair_params(params)
    r = _offsets(size, sigma)
    x = r.view(1, 1, 1, size)  # along W
    y = r.view(1, 1, size, 1)  # along H
    p = {name: t[..., None, None] for name, t in params.items()}  # (cout, cin) -> (cout, cin, 1, 1)
    xp = x * torch.cos(p["theta"]) + y * torch.sin(p["theta"])
    envelope = torch.exp(-(x * x + y * y) / (2 * p["sigma"] ** 2))  # (cout, cin, k, k)
    return envelope * _sinusoid(xp, p["a_re"], p["a_im"], p["f_re"], p["f_im"], p["psi"])


# --- fused generation: eq. 2 as a sum of separable complex terms -------------------------------------
#
# With c = a_re e^{i psi} for the cosine term, c = -i a_im e^{i psi} for the sine term, w = 2 pi f and
# x' = u . x (u the unit direction), every term of eq. 2 factorises over the axes:
#     term = Re( [g(z) e^{i w u_z z}] c [g(y) e^{i w u_y y}] [g(x) e^{i w u_x x}] ),  g the 1D Gaussian,
# so a kernel is the real part of a sum of two rank-1 complex tensors, fixed by 1 + 2 d + 4 numbers per
# pair. `medexp.nn.separable.gabor_weight` computes those numbers and multiplies the factors out (C kernels
# on CPU, PyTorch operations elsewhere).


def gabor_kernel3d_fused(
    sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi, size: int, channels_last: bool = True
) -> Tensor:
    """`gabor_kernel3d` (eq. 2) by separable factors: same arguments, same (cout, cin, k, k, k) result.

    About 10x fewer transcendental and elementwise operations than the direct formula; the k^3 values are
    written once (`medexp.nn.separable.gabor_weight`), in the channels-last or the contiguous layout.
    """
    params = (sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi)
    _check_pair_params(dict(zip(NAMES_3D, params, strict=True)))
    angles = (theta_y, theta_z)
    return gabor_weight(
        sigma, angles, a_re, a_im, f_re, f_im, psi, size, channels_last
    )  # (cout, cin, D, H, W)


def gabor_kernel2d_fused(
    sigma, theta, a_re, a_im, f_re, f_im, psi, size: int, channels_last: bool = True
) -> Tensor:
    """`gabor_kernel2d` by separable factors (see `gabor_kernel3d_fused`): (cout, cin, k, k)."""
    _check_pair_params(dict(zip(NAMES_2D, (sigma, theta, a_re, a_im, f_re, f_im, psi), strict=True)))
    return gabor_weight(
        sigma, (theta,), a_re, a_im, f_re, f_im, psi, size, channels_last
    )  # (cout, cin, H, W)


class _GaborConvNd(nn.Module):
    """Shared machinery of GaborConv2d / GaborConv3d: parameters, initialisation, 'same' convolution."""

    spatial_dims: int
    angle_names: tuple[str, ...]
    fused_kernel: Callable[..., Tensor]  # gabor_kernel{3,2}d_fused: (sigma, *angles, *amplitudes, size, cl)

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 7, bias: bool = True, impl: str = "auto"
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"Gabor impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Gabor kernel_size must be a positive odd integer, got {kernel_size}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.impl = int(kernel_size), impl
        shape = (self.out_channels, self.in_channels)
        # sigma is stored through softplus (sigma = softplus(sigma_raw) + SIGMA_MIN), so it stays positive.
        self.param_names = ("sigma_raw", *self.angle_names, "a_re", "a_im", "f_re", "f_im", "psi")
        for name in self.param_names:
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self._kernel_cache: tuple | None = None  # (parameter versions, kernel), see `kernel`
        self._spectrum_cache: tuple | None = None  # (parameter versions, spectrum), see `spectrum`
        self.used_impl: str | None = None  # the implementation of the last forward pass
        self.reset_parameters()

    @property
    def sigma(self) -> Tensor:
        """The Gaussian width actually used, (cout, cin)."""
        return F.softplus(self.sigma_raw) + SIGMA_MIN

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation that trains (the paper leaves it open).

        - Orientations spread uniformly over directions (see `_init_angles`), so a layer starts with
          filters looking every way instead of all along one axis.
        - Frequencies uniform in [0, 0.3] cycles/voxel: from envelope-only (blob) filters at 0 to ~3-voxel
          periods, safely below the Nyquist limit of 0.5 where the sampled sinusoid aliases. psi uniform.
        - sigma uniform in [k/4, k/2]: the envelope spans most of the k-voxel support without being cut
          off to a box (for k = 7: 1.75 to 3.5 voxels).
        - Amplitudes a_re, a_im ~ N(0, s^2) per pair with s chosen so that the expected squared norm of the
          generated kernel equals that of nn.Conv{2,3}d's default (Kaiming-uniform, a = sqrt(5)) weights,
          whose entries have variance 1 / (3 fan_in): E[sum G^2] = s^2 sum_x g(x)^2 (the cos^2 and sin^2
          factors average to 1/2 each), so s^2 = 1 / (3 cin sum_x g(x)^2). A unit-variance input then gives
          an output variance ~ 1/3, as for the conventional kernels of the same network, so mixed models
          start with matched activation scales and GroupNorm sees comparable statistics.
        - Bias as nn.Conv: uniform in +-1 / sqrt(fan_in), fan_in = cin * k^d.
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

    def _generate(self, size: int, channels_last: bool) -> Tensor:
        """The central size^d taps of the weight from the current parameters (fused separable generation),
        with autograd."""
        angles, amplitudes = self._angles_and_amplitudes()
        return self.fused_kernel(self.sigma, *angles, *amplitudes, size, channels_last)

    def _angles_and_amplitudes(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The orientation angles and (a_re, a_im, f_re, f_im, psi), as medexp.nn.separable takes them."""
        angles = tuple(getattr(self, name) for name in self.angle_names)
        return angles, (self.a_re, self.a_im, self.f_re, self.f_im, self.psi)

    def _cached(self, slot: str, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """make() while autograd records (training); else cached in attribute `slot` until a parameter
        changes: the key holds every Gabor parameter's storage and version counter, which in-place updates
        (optimiser steps, load_state_dict, .to()) advance or replace. One cached tensor per layer at a time
        (a weight or a kernel spectrum, up to ~100 MB on the deepest level), none while training."""
        if torch.compiler.is_compiling() or self._params_record_grad():
            self._kernel_cache = self._spectrum_cache = None  # stale after the next optimiser step anyway
            return make()
        params = [getattr(self, n) for n in self.param_names]
        key = (*key, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        cache = getattr(self, slot)
        if cache is None or cache[0] != key:
            self._kernel_cache = self._spectrum_cache = None  # free the old one before making the new one
            with torch.no_grad():
                cache = (key, make())
            setattr(self, slot, cache)
        return cache[1]

    def fused_tiles(self) -> int:
        """Tiles (x batch) up to which `spectral_product` builds the spectrum inside the product: 0 where
        the C kernels do not run (GPU, torch.compile, no compiler)."""
        return FUSED_MAX_TILES if native_available(self.sigma_raw) else 0

    def spectral_product(self, size: int) -> Product:
        """The FFT convolution's channel product with the spectrum of the central size^d taps
        (`medexp.nn.fftconv.spectral_conv`): for up to `fused_tiles()` tiles by the C kernels that build
        each block of the spectrum where they use it (`gabor_spectral_product`; never stored, so nothing to
        cache); otherwise with the stored spectrum (`spectrum`), whose cost many tiles share."""
        stored = spectrum_product(lambda sizes: self.spectrum(size, sizes))
        fused_tiles = self.fused_tiles()
        angles, amplitudes = self._angles_and_amplitudes()

        def product(x_spectra: Tensor, sizes: tuple[int, ...]) -> Tensor:
            if x_spectra.shape[1] > fused_tiles:
                return stored(x_spectra, sizes)
            return gabor_spectral_product(x_spectra, self.sigma, angles, *amplitudes, size, sizes)

        return product

    def spectrum(self, size: int, sizes: tuple[int, ...]) -> Tensor:
        """The kernel spectrum of the central size^d taps for FFT sizes `sizes`, (2, F, cin, cout) as
        `medexp.nn.fftconv.kernel_spectrum`, straight from the parameters (`gabor_spectrum`); cached like
        `kernel` without autograd."""
        angles, amplitudes = self._angles_and_amplitudes()
        make = lambda: gabor_spectrum(self.sigma, angles, *amplitudes, size, sizes)  # noqa: E731
        return self._cached("_spectrum_cache", (size, tuple(sizes)), make)

    def kernel(self, size: int | None = None, channels_last: bool = True) -> Tensor:
        """The generated weight, (cout, cin, s, ..., s): its central s = size taps per axis (default all k),
        laid out channels-last or contiguous in memory (on CPU; elsewhere always contiguous).

        Generated on every call while autograd records (training). Without autograd (evaluation,
        inference) the kernel is cached until a parameter changes: the key holds every Gabor parameter's
        storage and version counter, which in-place updates (optimiser steps, load_state_dict, .to())
        advance or replace.
        """
        size = self.kernel_size if size is None else size
        if size < 1 or size % 2 == 0 or size > self.kernel_size:
            raise ValueError(f"kernel size must be odd and at most {self.kernel_size}, got {size}")
        make = lambda: self._generate(size, channels_last)  # noqa: E731
        return self._cached("_kernel_cache", (size, channels_last), make)

    def _params_record_grad(self) -> bool:
        """Whether autograd records the kernel generation (grad mode on and a parameter trainable)."""
        return torch.is_grad_enabled() and any(getattr(self, n).requires_grad for n in self.param_names)

    def forward(self, x: Tensor) -> Tensor:
        """'Same'-padded, stride-1 convolution with the generated kernel: (B, cin, *S) -> (B, cout, *S).

        impl "direct" is F.conv{2,3}d in x's memory layout, "direct_contiguous" F.conv{2,3}d in the
        contiguous one, "fft" `medexp.nn.fftconv.fft_conv`, "gemm" im2col + GEMM, "auto" the fastest for this
        input shape (measured once per shape, see `medexp.nn.fftconv.choose_impl`).
        On volumes smaller than the kernel only the taps that can meet a voxel are generated (e.g. 3^3
        of the 7^3 on 2^3 voxels, see `medexp.nn.fftconv.reach`): the result is the same.
        """
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.in_channels}, *spatial) with "
                f"{self.spatial_dims} spatial dims, got shape {tuple(x.shape)}"
            )
        taps = tuple(reach(self.kernel_size, n) for n in x.shape[2:])
        grad = self._params_record_grad() or (torch.is_grad_enabled() and x.requires_grad)
        impl = resolve_impl(x, (self.out_channels, self.in_channels, *taps), grad, self.impl, self)
        if not torch.compiler.is_compiling():
            self.used_impl = impl  # what "auto" picked, for the run's record (medexp.train logs it)
        return self.run_impl(impl, x)

    def run_impl(self, impl: str, x: Tensor) -> Tensor:
        """The convolution of x by `impl` (not "auto"), generation included: for fft the kernel spectrum
        straight from the parameters (`spectral_product`); otherwise the weight, generated in the memory
        layout the implementation runs in, so that neither the weight nor its gradient is copied between
        layouts (such copies cost up to half a 7^3 convolution, see README Performance); while training on
        the smallest volumes the direct paths form the parameters' gradient without dL/dW (`gabor_conv`)."""
        spatial = tuple(x.shape[2:])
        taps = tuple(reach(self.kernel_size, n) for n in spatial)
        shape = (self.out_channels, self.in_channels, *taps)
        if impl == "fft" and len(set(taps)) == 1:
            product = self.spectral_product(taps[0])
            return spectral_conv(x, shape, product, self.bias, fused_tiles=self.fused_tiles())
        if impl in ("direct", "direct_contiguous") and self._fuses_gradient(x, taps):
            angles, amplitudes = self._angles_and_amplitudes()
            return gabor_conv(x, self.sigma, angles, *amplitudes, taps[0], self.bias, impl)
        weight = self.kernel(max(taps), channels_last=weight_channels_last(x, impl))
        return same_conv(x, crop_to_reach(weight, spatial), self.bias, impl)

    def _fuses_gradient(self, x: Tensor, taps: tuple[int, ...]) -> bool:
        """Whether the direct paths run `gabor_conv`, which forms the parameters' gradient without dL/dW:
        while training, on CPU with the C kernels, for a cubic reach and where `fused_gradient_pays`."""
        return (
            self._params_record_grad()
            and len(set(taps)) == 1
            and native_available(self.sigma_raw)
            and x.dtype == self.sigma_raw.dtype
            and x.device == self.sigma_raw.device
            and fused_gradient_pays(x.shape[0], tuple(x.shape[2:]), taps[0])
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}, impl={self.impl!r}"
        )


class GaborConv3d(_GaborConvNd):
    """Drop-in for nn.Conv3d(cin, cout, k, padding=k // 2) with Gabor-based kernels (eq. 2).

    8 trainable parameters per (out, in) pair {sigma, theta_y, theta_z, a_re, a_im, f_re, f_im, psi}, each
    stored as a (cout, cin) tensor, plus one bias per output channel: 8 cin cout + cout in total.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: odd size k of the generated k^3 kernel (7 in the paper).
        bias: add a learnable bias per output channel.
        impl: "direct" (F.conv3d in the input's memory layout), "direct_contiguous" (F.conv3d in the
            contiguous layout), "fft" (convolution theorem, `medexp.nn.fftconv`), "gemm" (im2col + GEMM,
            for small volumes) or "auto" (the fastest, measured once per input shape).
    """

    spatial_dims = 3
    angle_names = ("theta_y", "theta_z")
    fused_kernel = staticmethod(gabor_kernel3d_fused)

    def _init_angles(self) -> None:
        # x' = u . (x, y, z) with u = (cos ty cos tz, -cos ty sin tz, sin ty), a unit vector; sin(theta_y)
        # uniform in [-1, 1] and theta_z uniform in [-pi, pi) make u uniform on the sphere.
        self.theta_y.copy_(torch.asin(torch.empty_like(self.theta_y).uniform_(-1.0, 1.0)))
        self.theta_z.uniform_(-math.pi, math.pi)


class GaborConv2d(_GaborConvNd):
    """Drop-in for nn.Conv2d(cin, cout, k, padding=k // 2) with 2D Gabor-based kernels.

    7 trainable parameters per (out, in) pair {sigma, theta, a_re, a_im, f_re, f_im, psi}, each a (cout, cin)
    tensor, plus one bias per output channel: 7 cin cout + cout in total. Arguments as `GaborConv3d`.
    """

    spatial_dims = 2
    angle_names = ("theta",)
    fused_kernel = staticmethod(gabor_kernel2d_fused)

    def _init_angles(self) -> None:
        # x' = u . (x, y) with u = (cos theta, sin theta): theta uniform gives uniform directions.
        self.theta.uniform_(-math.pi, math.pi)
