"""Eq. 2 of Wong & Moradi (medexp.nn.gabor) as a sum of two separable complex kernels: the 1D factors per
axis that the fast paths (medexp.nn.fast, its C kernels) multiply out, computed here in PyTorch under
autograd, so that the fast paths never see eq. 2's parameters (docs/design.md §5, "How it is computed").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def offsets(size: int, like: Tensor) -> Tensor:
    """Integer offsets from the kernel centre, e.g. size 7 -> [-3, ..., 3], on like's device and dtype."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gabor kernel size must be a positive odd integer, got {size}")
    return torch.arange(-(size // 2), size // 2 + 1, device=like.device, dtype=like.dtype)


def check_pair_params(params: tuple[Tensor, ...]) -> None:
    shapes = [tuple(p.shape) for p in params]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"Gabor parameters must all be (cout, cin) tensors of one shape, got {shapes}")


def _direction(angles: tuple[Tensor, ...]) -> Tensor:
    """The unit vector u of x' = u . x along the weight's spatial axes, (d, cout, cin): 3D (theta_y, theta_z)
    along (D, H, W) = (z, y, x): u = (sin ty, -cos ty sin tz, cos ty cos tz); 2D (theta,) along (H, W) =
    (y, x): u = (sin theta, cos theta)."""
    if len(angles) == 2:
        theta_y, theta_z = angles
        cos_y = torch.cos(theta_y)
        return torch.stack([torch.sin(theta_y), -cos_y * torch.sin(theta_z), cos_y * torch.cos(theta_z)])
    (theta,) = angles
    return torch.stack([torch.sin(theta), torch.cos(theta)])


def gabor_factors(*params: Tensor, size: int) -> Tensor:
    """Eq. 2 as a sum of two separable complex kernels: its 1D factors per axis, differentiable.

    With Re(e^{i p}) = cos p and Re(-i e^{i p}) = sin p, eq. 2 is G = Re sum_t c_t g(|x|) e^{i 2 pi f_t x'}
    for the terms t = 0 (cosine: f_re, c_0 = a_re e^{i psi}) and t = 1 (sine: f_im, c_1 = -i a_im e^{i psi}
    = a_im e^{i (psi - pi / 2)}). The isotropic envelope g(|x|) = prod_j exp(-x_j^2 / (2 sigma^2)) and
    e^{i 2 pi f_t x'} = prod_j e^{i 2 pi f_t u_j x_j} (x' = u . x, `_direction`) factorise over the axes, so

        W[.., x_0, .., x_{d-1}] = sum_t Re prod_j F_j,t[x_j],
        F_j,t[r] = exp(-r^2 / (2 sigma^2)) e^{i 2 pi f_t u_j r}, the last axis also times c_t.

    params: eq. 2's (cout, cin) tensors in `gabor_kernel3d`'s order (sigma, theta_y, theta_z, a_re, a_im,
    f_re, f_im, psi) or `gabor_kernel2d`'s (sigma, theta, ...); size: odd k, offsets r = -(k // 2)..k // 2.
    Returns (d, k, 2, 2, cout, cin): F_j,t[r] as (re, im) for axis j (weight order: D, H, W or H, W), tap r,
    term t, with the channel pairs innermost, the layout medexp.nn.fast's C kernels read.
    """
    check_pair_params(params)
    sigma, *angles, a_re, a_im, f_re, f_im, psi = params
    r = offsets(size, sigma).view(1, size, 1, 1, 1)  # (axis, tap, term, cout, cin)
    u = _direction(tuple(angles))  # (d, cout, cin)
    phase = 2 * math.pi * r * u[:, None, None] * torch.stack([f_re, f_im])  # (d, k, 2, cout, cin)
    envelope = torch.exp(-r * r / (2 * sigma**2))  # (1, k, 1, cout, cin): one axis' share of g
    # the last axis carries c_t = |c_t| e^{i arg c_t}: magnitude a_re, a_im and phase psi, psi - pi / 2
    phase = torch.cat([phase[:-1], phase[-1:] + torch.stack([psi, psi - math.pi / 2])])
    last = envelope * torch.stack([a_re, a_im])  # (1, k, 2, cout, cin)
    magnitude = torch.cat([envelope.expand(u.shape[0] - 1, -1, 2, -1, -1), last])  # (d, k, 2, cout, cin)
    return torch.stack([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], 3)
