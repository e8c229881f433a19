"""FFT convolution against F.conv{2,3}d, and the Gabor layer's fft / direct / auto paths and kernel cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medexp.nn import fftconv, gabor
from medexp.nn.fftconv import (
    _format_of,
    choose_impl,
    fft_conv,
    gemm_conv,
    kernel_spectrum,
    plan_tiles,
    same_conv,
)
from medexp.nn.gabor import (
    GaborConv2d,
    GaborConv3d,
    gabor_kernel2d,
    gabor_kernel2d_fused,
    gabor_kernel3d,
    gabor_kernel3d_fused,
)


def assert_close_scaled(got, want, rtol=2e-5):
    """Float32 agreement relative to the tensor's scale (FFT rounding spreads over all outputs)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()) + 1e-7)


def grads(fn, *tensors, seed=0):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return (out, *torch.autograd.grad(out, tensors, g))


# (spatial shape, kernel size, forced tile or None): single tiles, several tiles, odd and unequal sizes.
CASES = [
    ((9, 9, 9), 7, None),
    ((4, 4, 4), 7, None),
    ((11, 6, 13), 7, 12),
    ((10, 9, 7), 5, 8),
    ((17, 23), 7, None),
    ((17, 23), 7, 12),
    ((5, 6), 3, None),
    ((31, 8), 5, 10),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, k, tile", CASES)
def test_fft_conv_matches_conv_forward_and_grads(shape, k, tile, channels_last):
    torch.manual_seed(0)
    d = len(shape)
    x = torch.randn(2, 3, *shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if d == 3 else torch.channels_last)
    w, b = torch.randn(4, 3, *[k] * d), torch.randn(4)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    conv = F.conv3d if d == 3 else F.conv2d
    want = grads(lambda x, w, b: conv(x, w, b, padding=k // 2), x, w, b)
    for impl in (lambda x, w, b: fft_conv(x, w, b, tile=tile), gemm_conv):
        got = grads(impl, x, w, b)
        for g, r in zip(got, want, strict=True):
            assert g.shape == r.shape
            assert_close_scaled(g, r)
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d if d == 3 else torch.channels_last) or (
        not channels_last and got[0].is_contiguous()
    )


def test_fft_conv_exact_in_float64_and_bias_free():
    torch.manual_seed(1)
    x, w = torch.randn(1, 2, 12, 7, 9, dtype=torch.float64), torch.randn(3, 2, 7, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(fft_conv(x, w, tile=12), F.conv3d(x, w, padding=3), rtol=1e-10, atol=1e-10)


def test_kernel_spectrum_is_conj_rfftn():
    torch.manual_seed(2)
    w = torch.randn(3, 2, 5, 5, 5, dtype=torch.float64)
    sizes = (8, 10, 12)
    spectrum = kernel_spectrum(w, sizes)  # (re/im, F, cin, cout)
    assert spectrum.shape == (2, 8 * 10 * 7, 2, 3)
    want = torch.fft.rfftn(w, s=sizes, dim=(2, 3, 4)).conj()  # (cout, cin, 8, 10, 7)
    want = want.permute(2, 3, 4, 1, 0).reshape(-1, 2, 3)  # (F, cin, cout)
    torch.testing.assert_close(torch.complex(spectrum[0], spectrum[1]), want)


def test_plan_tiles():
    assert plan_tiles((9, 9, 9), (7, 7, 7), 3, 4) == ((12, 9, 1),) * 3  # one tile: 12 >= 9 + 3
    axes = plan_tiles((20, 5), (7, 7), 3, 4, tile=12)
    assert axes == ((12, 6, 4), (8, 5, 1))  # 6 valid outputs per 12-tile; 5 + 3 fits one FFT of 8
    # a product that builds its own spectrum has no spectrum to share between tiles: one tile of 20 >= 16 + 3
    assert plan_tiles((16, 16, 16), (7, 7, 7), 48, 48, fused_tiles=4) == ((20, 16, 1),) * 3
    assert plan_tiles((16, 16, 16), (7, 7, 7), 48, 48) != ((20, 16, 1),) * 3  # stored: smaller tiles
    with pytest.raises(ValueError, match="odd"):
        fft_conv(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="do not match"):
        fft_conv(torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 3, 3))


@pytest.mark.parametrize("size", [3, 7])
def test_fused_generation_matches_formula(size):
    torch.manual_seed(3)
    conv3, conv2 = GaborConv3d(3, 4, size), GaborConv2d(3, 4, size)
    with torch.no_grad():  # move away from the initial ranges: every parameter matters
        for p in [*conv3.parameters(), *conv2.parameters()]:
            p.add_(0.5 * torch.randn_like(p))
    for conv, ref_fn, fused_fn in (
        (conv3, gabor_kernel3d, gabor_kernel3d_fused),
        (conv2, gabor_kernel2d, gabor_kernel2d_fused),
    ):
        params = [conv.sigma, *[getattr(conv, n) for n in conv.param_names[1:]]]
        want = grads(lambda *p, f=ref_fn: f(*p, size=size), *params)
        got = grads(lambda *p, f=fused_fn: f(*p, size=size), *params)
        for g, r in zip(got, want, strict=True):
            assert_close_scaled(g, r, rtol=1e-5)


@pytest.mark.parametrize("cls, shape", [(GaborConv3d, (2, 3, 9, 10, 11)), (GaborConv2d, (2, 3, 21, 17))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fused_max_tiles", [0, 4])  # fft: the stored spectrum's product, or the fused one
def test_gabor_fft_and_gemm_equal_direct(cls, shape, channels_last, fused_max_tiles, monkeypatch):
    monkeypatch.setattr(gabor, "FUSED_MAX_TILES", fused_max_tiles)
    torch.manual_seed(4)
    layers = {impl: cls(3, 5, 7, impl=impl) for impl in ("direct", "direct_contiguous", "fft", "gemm")}
    for impl in ("direct_contiguous", "fft", "gemm"):
        layers[impl].load_state_dict(layers["direct"].state_dict())
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if len(shape) == 5 else torch.channels_last)
    results = {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
        results[impl] = [out, xi.grad, *[p.grad for p in layer.parameters()]]
    for impl in ("direct_contiguous", "fft", "gemm"):
        for got, want in zip(results[impl], results["direct"], strict=True):
            assert got.is_contiguous(memory_format=_format_of(want))  # in the input's layout
            assert_close_scaled(got, want, rtol=5e-5)


def test_kernel_cache_in_eval_only():
    torch.manual_seed(6)
    conv = GaborConv3d(2, 3, 5, impl="direct")
    with torch.no_grad():
        first, second = conv.kernel(), conv.kernel()
        assert first is second  # cached while the parameters are unchanged
        conv.psi.add_(0.1)  # an in-place update (optimiser step) bumps the version counter
        third = conv.kernel()
    assert third is not first and not torch.equal(third, first)
    torch.testing.assert_close(third, conv._generate(conv.kernel_size, True).detach())
    trained = conv.kernel()
    assert trained.requires_grad and trained is not conv.kernel()  # with autograd: generated every call
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv3d(x, conv._generate(5, True), conv.bias, padding=2))
        contiguous = conv.kernel(channels_last=False)
        assert contiguous.is_contiguous() and contiguous is not third  # the layout is in the cache key
        torch.testing.assert_close(contiguous, third, rtol=0, atol=0)
        spectrum = conv.spectrum(5, (8, 8, 8))
        assert spectrum is conv.spectrum(5, (8, 8, 8)) and conv._kernel_cache is None  # one cache at a time
        torch.testing.assert_close(spectrum, kernel_spectrum(contiguous, (8, 8, 8)))
    conv.kernel()  # training: nothing cached, nothing kept
    assert conv._kernel_cache is None and conv._spectrum_cache is None


def test_auto_choice_is_measured_once_and_cached(monkeypatch):
    calls = []
    monkeypatch.setattr(fftconv, "_AUTO_CHOICE", {})
    monkeypatch.setattr(
        fftconv, "_measure", lambda x, w, grad, candidates, layer: calls.append(grad) or "fft"
    )
    x, w = torch.randn(1, 2, 8, 8, 8), torch.randn(3, 2, 7, 7, 7)
    assert choose_impl(x, w.shape, False) == "fft" and choose_impl(x, w.shape, False) == "fft"
    assert calls == [False]  # no grad needed -> one forward-only measurement
    assert choose_impl(x, w.shape, True) == "fft" and calls == [False, True]  # grad mode is in the key
    assert choose_impl(x, (3, 2, 3, 3, 3), True) == "direct"  # 27-tap kernels never measured
    torch.testing.assert_close(same_conv(x, w, impl="auto"), F.conv3d(x, w, padding=3), rtol=1e-4, atol=1e-3)


def test_auto_measurement_runs():
    torch.manual_seed(7)
    conv = GaborConv3d(2, 3, 7, impl="auto")
    x = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    conv(x).sum().backward()
    key = fftconv.auto_key(x, conv.kernel().shape, True, "GaborConv3d")  # timed by the layer itself
    assert fftconv._AUTO_CHOICE[key] in ("direct", "direct_contiguous", "fft", "gemm")
    assert x.grad is not None and all(p.grad is not None for p in conv.parameters())


@pytest.mark.parametrize("impl", ["direct", "direct_contiguous", "gemm", "fft", "auto"])
@pytest.mark.parametrize("spatial", [(1, 1, 1), (2, 2, 2), (2, 5, 1), (3, 9)])
def test_small_volumes_use_only_the_taps_that_reach_them(impl, spatial):
    # On n voxels a 'same' 7-tap axis has only min(7, 2n - 1) taps that ever meet the volume: the cropped
    # convolution must equal the full 7^d one, values and gradients (the cropped taps' gradients are zero).
    torch.manual_seed(8)
    d = len(spatial)
    x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, *[7] * d, dtype=torch.float64, requires_grad=True)
    conv = F.conv3d if d == 3 else F.conv2d
    want = grads(lambda a, b: conv(a, b, padding=3), x, w)
    got = grads(lambda a, b: same_conv(a, b, impl=impl), x, w)
    assert fftconv.crop_to_reach(w, spatial).shape[2:] == tuple(min(7, 2 * n - 1) for n in spatial)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["direct", "direct_contiguous", "fft", "gemm"])
def test_gabor_layer_on_volumes_smaller_than_its_kernel(impl):
    # GaborConv3d generates only the central 3^3 taps (or their spectrum, for fft) for 2^3 voxels and 1 tap
    # for 1^3: same result as nn.Conv3d with the whole generated 7^3 kernel; (2, 5, 1) crops per axis.
    torch.manual_seed(9)
    layer = GaborConv3d(3, 4, 7, impl=impl).double()
    for shape in ((1, 1, 1), (2, 2, 2), (3, 3, 3), (2, 5, 1)):
        x = torch.randn(2, 3, *shape, dtype=torch.float64)
        want = F.conv3d(x, layer.kernel().detach(), layer.bias.detach(), padding=3)
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
