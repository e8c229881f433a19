"""Gabor-based kernels (Wong & Moradi eq. 2) against an independent NumPy evaluation, and the layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medexp.nn.gabor import GaborConv2d, GaborConv3d, gabor_kernel2d, gabor_kernel3d
from medexp.nn.kernels import GaborKernels, MixedKernels
from medexp.nn.wong import WongNet

NAMES_3D = ("sigma", "theta_y", "theta_z", "a_re", "a_im", "f_re", "f_im", "psi")
NAMES_2D = ("sigma", "theta", "a_re", "a_im", "f_re", "f_im", "psi")


def random_params(names, cout=3, cin=2, seed=0):
    rng = np.random.default_rng(seed)
    params = {name: rng.uniform(-math.pi, math.pi, (cout, cin)) for name in names}
    params["sigma"] = rng.uniform(0.8, 3.0, (cout, cin))
    params["f_re"] = rng.uniform(0.0, 0.45, (cout, cin))
    params["f_im"] = rng.uniform(0.0, 0.45, (cout, cin))
    return params


def numpy_gabor3d(p, size):
    """Eq. 2 evaluated voxel by voxel; kernel[o, i, z, y, x] with x along the last axis."""
    half = size // 2
    cout, cin = p["sigma"].shape
    out = np.zeros((cout, cin, size, size, size))
    for o in range(cout):
        for i in range(cin):
            q = {k: v[o, i] for k, v in p.items()}
            for iz, z in enumerate(range(-half, half + 1)):
                for iy, y in enumerate(range(-half, half + 1)):
                    for ix, x in enumerate(range(-half, half + 1)):
                        ty, tz = q["theta_y"], q["theta_z"]
                        xp = (
                            math.cos(ty) * math.cos(tz) * x
                            - math.cos(ty) * math.sin(tz) * y
                            + math.sin(ty) * z
                        )
                        g = math.exp(-(x * x + y * y + z * z) / (2 * q["sigma"] ** 2))
                        s = q["a_re"] * math.cos(2 * math.pi * q["f_re"] * xp + q["psi"])
                        s += q["a_im"] * math.sin(2 * math.pi * q["f_im"] * xp + q["psi"])
                        out[o, i, iz, iy, ix] = g * s
    return out


def numpy_gabor2d(p, size):
    """2D eq. 2 with x' = x cos(theta) + y sin(theta), via meshgrid; kernel[o, i, y, x]."""
    r = np.arange(size) - size // 2
    y, x = np.meshgrid(r, r, indexing="ij")  # y varies along axis 0 (H), x along axis 1 (W)
    q = {k: v[:, :, None, None] for k, v in p.items()}
    xp = x * np.cos(q["theta"]) + y * np.sin(q["theta"])
    g = np.exp(-(x**2 + y**2) / (2 * q["sigma"] ** 2))
    s = q["a_re"] * np.cos(2 * np.pi * q["f_re"] * xp + q["psi"])
    s = s + q["a_im"] * np.sin(2 * np.pi * q["f_im"] * xp + q["psi"])
    return g * s


def to_torch(p):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in p.items()}


@pytest.mark.parametrize("size", [3, 7])
def test_kernel3d_matches_numpy(size):
    p = random_params(NAMES_3D)
    got = gabor_kernel3d(**to_torch(p), size=size)
    assert got.shape == (3, 2, size, size, size)
    np.testing.assert_allclose(got.numpy(), numpy_gabor3d(p, size), rtol=1e-4, atol=1e-5)


def test_kernel2d_matches_numpy():
    p = random_params(NAMES_2D, cout=4, cin=3, seed=1)
    got = gabor_kernel2d(**to_torch(p), size=7)
    assert got.shape == (4, 3, 7, 7)
    np.testing.assert_allclose(got.numpy(), numpy_gabor2d(p, 7), rtol=1e-4, atol=1e-5)


def _one_pair(**values):
    return {k: torch.tensor([[float(v)]]) for k, v in values.items()}


def test_kernel3d_axis_convention():
    # theta_y = theta_z = 0: x' = x (last axis). With sigma huge the envelope is ~flat, so the kernel is
    # cos(2 pi f x + psi): it varies along W only.
    base = dict(sigma=1e4, a_re=1.0, a_im=0.0, f_re=0.2, f_im=0.0, psi=0.3)
    k = gabor_kernel3d(**_one_pair(theta_y=0.0, theta_z=0.0, **base), size=5)[0, 0]  # (D, H, W)
    x = torch.arange(-2, 3, dtype=torch.float32)
    torch.testing.assert_close(k[2, 2], torch.cos(2 * math.pi * 0.2 * x + 0.3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k, k[:1, :1, :].expand_as(k), rtol=1e-4, atol=1e-5)  # constant along D and H
    # theta_y = pi/2: x' = z (first axis); theta_y = 0, theta_z = -pi/2: x' = y (middle axis).
    kz = gabor_kernel3d(**_one_pair(theta_y=math.pi / 2, theta_z=0.0, **base), size=5)[0, 0]
    torch.testing.assert_close(kz[:, 2, 2], torch.cos(2 * math.pi * 0.2 * x + 0.3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kz, kz[:, :1, :1].expand_as(kz), rtol=1e-4, atol=1e-5)
    ky = gabor_kernel3d(**_one_pair(theta_y=0.0, theta_z=-math.pi / 2, **base), size=5)[0, 0]
    torch.testing.assert_close(ky[2, :, 2], torch.cos(2 * math.pi * 0.2 * x + 0.3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ky, ky[:1, :, :1].expand_as(ky), rtol=1e-4, atol=1e-5)


def test_kernel2d_axis_convention():
    base = dict(sigma=1e4, a_re=0.0, a_im=1.0, f_re=0.0, f_im=0.15, psi=0.0)
    x = torch.arange(-3, 4, dtype=torch.float32)
    kx = gabor_kernel2d(**_one_pair(theta=0.0, **base), size=7)[0, 0]  # (H, W): theta = 0 -> along W
    torch.testing.assert_close(kx, torch.sin(2 * math.pi * 0.15 * x).expand(7, 7), rtol=1e-4, atol=1e-5)
    ky = gabor_kernel2d(**_one_pair(theta=math.pi / 2, **base), size=7)[0, 0]  # theta = pi/2 -> along H
    torch.testing.assert_close(
        ky, torch.sin(2 * math.pi * 0.15 * x)[:, None].expand(7, 7), rtol=1e-4, atol=1e-5
    )


def test_kernel_rejects_bad_shapes():
    p = to_torch(random_params(NAMES_3D))
    p["psi"] = p["psi"][:1]
    with pytest.raises(ValueError, match="cout, cin"):
        gabor_kernel3d(**p, size=7)
    with pytest.raises(ValueError, match="odd"):
        gabor_kernel3d(**to_torch(random_params(NAMES_3D)), size=4)


@pytest.mark.parametrize("cls, dims, n_params", [(GaborConv3d, 3, 8), (GaborConv2d, 2, 7)])
def test_layer_params_shape_and_grads(cls, dims, n_params):
    torch.manual_seed(0)
    conv = cls(3, 5, kernel_size=7)
    assert sum(p.numel() for p in conv.parameters()) == n_params * 3 * 5 + 5
    assert all(p.shape == (5, 3) for name, p in conv.named_parameters() if name != "bias")
    x = torch.randn(2, 3, *([9] * dims))
    y = conv(x)
    assert y.shape == (2, 5, *([9] * dims))
    y.square().mean().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert cls(3, 5, bias=False).bias is None
    assert sum(p.numel() for p in cls(3, 5, bias=False).parameters()) == n_params * 15


@pytest.mark.parametrize("impl", ["reference", "direct"])
def test_layer_matches_conv_with_its_weight(impl):
    torch.manual_seed(1)
    conv = GaborConv3d(2, 3, kernel_size=5, impl=impl)
    ref = nn.Conv3d(2, 3, 5, padding=2)
    with torch.no_grad():
        ref.weight.copy_(conv.weight())
        ref.bias.copy_(conv.bias)
    x = torch.randn(1, 2, 8, 8, 8)
    torch.testing.assert_close(conv(x), ref(x))
    assert conv.weight().shape == (3, 2, 5, 5, 5) and conv.used_impl == impl


def test_parameters_state_dict_and_seeded_init_are_unchanged():
    # Checkpoints and seeded runs depend on the parameter names, shapes, their order and the init's draws:
    # sums of every parameter after torch.manual_seed(0), as the layer initialised them before medexp.nn.fast.
    want = {
        GaborConv3d: {"sigma_raw": 35.3515231609, "theta_y": 0.8328477219, "theta_z": -9.4559831023,
                      "a_re": 0.2110084252, "a_im": 0.0173350306, "f_re": 2.3506310768, "f_im": 2.8188410215,
                      "psi": -4.4416069388, "bias": -0.027858628},
        GaborConv2d: {"sigma_raw": 13.1887652874, "theta": -7.2750494629, "a_re": 0.4304838218,
                      "a_im": -0.3798034091, "f_re": 1.4427106865, "f_im": 1.1270901896, "psi": -4.8285194635,
                      "bias": 0.4206045792},
    }  # fmt: skip
    for cls, args in ((GaborConv3d, (3, 5, 7)), (GaborConv2d, (2, 4, 5))):
        torch.manual_seed(0)
        state = cls(*args).state_dict()
        assert list(state) == list(want[cls])
        assert all(v.shape == ((args[1], args[0]) if k != "bias" else (args[1],)) for k, v in state.items())
        for name, total in want[cls].items():
            assert float(state[name].double().sum()) == pytest.approx(total, abs=1e-9), (cls, name)


def test_layer_contracts():
    with pytest.raises(ValueError, match="impl"):
        GaborConv3d(2, 3, impl="winograd")
    for impl in ("auto", "reference", "direct", "fft"):
        assert GaborConv3d(2, 3, impl=impl).impl == impl
    layer = GaborConv3d(2, 3)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.used_impl) == (2, 3, 7, None)
    torch.testing.assert_close(layer.sigma, torch.nn.functional.softplus(layer.sigma_raw) + 1e-2)
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\)"):
        GaborConv3d(2, 3)(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize(
    "cls, conv_cls, shape",
    [(GaborConv3d, nn.Conv3d, (2, 16, 16, 16, 16)), (GaborConv2d, nn.Conv2d, (4, 16, 40, 40))],
)
def test_init_output_scale_matches_default_conv(cls, conv_cls, shape):
    """Output std on unit-normal input within a factor 2 of nn.Conv's default (Kaiming-uniform) init.

    Measured ratios (Gabor / Conv, same fan-in) are ~0.95-1.15 for cin in 1..64.
    """
    torch.manual_seed(0)
    batch, cin, *spatial = shape
    x = torch.randn(batch, cin, *spatial)
    with torch.no_grad():
        gabor_std = cls(cin, 16, kernel_size=7)(x).std()
        conv_std = conv_cls(cin, 16, 7, padding=3)(x).std()
    assert 0.5 < gabor_std / conv_std < 2.0, (gabor_std, conv_std)


def test_init_ranges():
    torch.manual_seed(0)
    conv = GaborConv3d(8, 8, kernel_size=7)
    assert conv.sigma.min() >= 7 / 4 - 1e-4 and conv.sigma.max() <= 7 / 2 + 1e-4
    assert conv.f_re.min() >= 0 and conv.f_re.max() < 0.5 and conv.f_im.max() < 0.5


@pytest.mark.parametrize(
    "factory, expected",
    [
        (GaborKernels(), 1_528_544),
        (MixedKernels(), 1_597_172),
        (MixedKernels(conv_size=5), 1_951_148),
    ],
)
def test_wongnet_param_counts(factory, expected):
    model = WongNet(in_channels=1, num_classes=20, kernel=factory)
    assert sum(p.numel() for p in model.parameters()) == expected
