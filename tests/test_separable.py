"""The separable Gabor generation and its C kernels (medexp.nn.fast.generate, .spectrum, .product,
.gradient, .native) against the PyTorch operations they replace, values and gradients."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch

from medexp.nn.fast import generate, gradient, native
from medexp.nn.fast.direct import direct_conv, weight_channels_last
from medexp.nn.fast.generate import expand_torch, native_weight, rows_torch, torch_weight
from medexp.nn.fast.gradient import fused_gradient_conv
from medexp.nn.fast.product import channel_product, fused_product
from medexp.nn.fast.spectrum import kernel_spectrum, native_spectrum
from medexp.nn.gabor import GaborConv3d, gabor_kernel2d, gabor_kernel3d

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler")


def _params(cout: int, cin: int, d: int, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    """Random eq. 2 parameters (sigma, *angles, a_re, a_im, f_re, f_im, psi) as GaborConv initialises them."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return (torch.rand(cout, cin, generator=gen, dtype=dtype) * (high - low) + low).requires_grad_()

    sigma = uniform(0.8, 3.5)
    angles = [uniform(-math.pi, math.pi) for _ in range(d - 1)]
    amplitudes = [uniform(-1, 1), uniform(-1, 1), uniform(0, 0.3), uniform(0, 0.3)]
    amplitudes.append(uniform(-math.pi, math.pi))  # psi
    return [sigma, *angles, *amplitudes]


def _same_values_and_gradients(got, want, inputs) -> None:
    """got == want to 1e-12, and their gradients w.r.t. inputs for one random output gradient to 1e-10."""
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for g_got, g_want in zip(
        torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True
    ):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


def _on_threads(n: int, fn):
    """fn() with torch set to n threads, the caller's count restored after."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


def _weight(params, k, native: bool, channels_last: bool = True):
    """The weight by the C kernels, or by the separable PyTorch operations (the fallback)."""
    return native_weight(tuple(params), k, channels_last) if native else torch_weight(tuple(params), k)


def test_rows_from_eq2_parameters_give_the_formula():
    # q built by hand from eq. 2's parameters for one 3D pair: s = 1 / (2 sigma^2), w_jt = 2 pi u_j f_t,
    # c_0 = a_re e^{i psi}, c_1 = -i a_im e^{i psi}; expand must reproduce gabor_kernel3d.
    sigma, ty, tz, a_re, a_im, f_re, f_im, psi = 1.7, 0.4, -1.1, 0.8, -0.3, 0.12, 0.21, 0.5
    u = (math.sin(ty), -math.cos(ty) * math.sin(tz), math.cos(ty) * math.cos(tz))  # along (D, H, W)
    omega = [2 * math.pi * uj * f for uj in u for f in (f_re, f_im)]
    coef = [a_re * math.cos(psi), a_re * math.sin(psi), a_im * math.sin(psi), -a_im * math.cos(psi)]
    q = torch.tensor([[[1 / (2 * sigma**2), *omega, *coef]]], dtype=torch.float64)
    params = [torch.tensor([[v]], dtype=torch.float64) for v in (sigma, ty, tz, a_re, a_im, f_re, f_im, psi)]
    want = gabor_kernel3d(*params, size=5)
    torch.testing.assert_close(expand_torch(q, 5), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows_torch(tuple(params)), q)
    if native.available(params[0]):
        torch.testing.assert_close(native_weight(tuple(params), 5), want, rtol=1e-12, atol=1e-12)


def test_2d_rows_give_the_formula():
    sigma, theta, a_re, a_im, f_re, f_im, psi = 2.1, 0.7, -0.5, 0.9, 0.05, 0.3, -2.0
    u = (math.sin(theta), math.cos(theta))  # x' = x cos theta + y sin theta along (H, W)
    omega = [2 * math.pi * uj * f for uj in u for f in (f_re, f_im)]
    coef = [a_re * math.cos(psi), a_re * math.sin(psi), a_im * math.sin(psi), -a_im * math.cos(psi)]
    q = torch.tensor([[[1 / (2 * sigma**2), *omega, *coef]]], dtype=torch.float64)
    params = [torch.tensor([[v]], dtype=torch.float64) for v in (sigma, theta, a_re, a_im, f_re, f_im, psi)]
    torch.testing.assert_close(expand_torch(q, 7), gabor_kernel2d(*params, size=7), rtol=1e-12, atol=1e-12)


@needs_native
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("cout,cin", [(3, 1), (2, 16), (4, 37)])  # partial, one full, full + partial blocks
@pytest.mark.parametrize("channels_last", [True, False])
def test_native_matches_torch_values_and_gradients(d, cout, cin, channels_last):
    params = _params(cout, cin, d)
    got, want = _weight(params, 7, native=True, channels_last=channels_last), _weight(params, 7, native=False)
    assert got.stride(1) == 1 if channels_last else got.is_contiguous()  # the layout asked for
    _same_values_and_gradients(got, want, params)
    formula = (gabor_kernel3d if d == 3 else gabor_kernel2d)(*params, size=7)  # eq. 2 as written
    _same_values_and_gradients(_weight(params, 7, native=True, channels_last=channels_last), formula, params)


@needs_native
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("channels_last", [True, False])
def test_native_gradcheck(d, channels_last):
    params = _params(2, 19, d, seed=3)
    assert torch.autograd.gradcheck(
        lambda *p: _weight(p, 5, native=True, channels_last=channels_last), params, fast_mode=True
    )


@needs_native
def test_native_float32_and_threads(monkeypatch):
    params = _params(24, 40, 3, seed=4)
    want = _weight(params, 7, native=False).detach()
    monkeypatch.setattr(native, "MIN_PER_THREAD", 64)  # several ranges even for this small layer
    floats = [p.detach().float() for p in params]
    for n in (1, 3):  # one range, and ranges that split the 24 * 3 blocks and 960 pairs unevenly
        for channels_last in (True, False):
            got = _on_threads(n, lambda cl=channels_last: _weight(floats, 7, native=True, channels_last=cl))
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_sizes_are_rejected():
    with pytest.raises(ValueError, match="cout, cin, 11"):
        expand_torch(torch.zeros(4, 11), 7)
    with pytest.raises(ValueError, match="odd"):
        native_weight((torch.ones(1, 1),) * 8, k=4)
    with pytest.raises(ValueError, match="even lengths"):
        native_spectrum((torch.ones(1, 1),) * 8, 3, (8, 7, 8))


def test_no_compiler_falls_back_with_one_warning(tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("MEDEXP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDEXP_REQUIRE_NATIVE", raising=False)  # CI requires the C kernels; not this test
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not compile .*separable.c.*broken-cc: cannot compile"):
            assert native.library() is None
        assert not native.available(torch.zeros(1))
        torch.manual_seed(0)
        layer, x = GaborConv3d(3, 2, 5, impl="direct"), torch.randn(1, 3, 6, 6, 6)
        torch.testing.assert_close(layer(x), layer.reference(x))  # the PyTorch generation
    finally:
        native.library.cache_clear()


@pytest.mark.slow  # compiles the C kernels into a fresh cache
@needs_native
def test_build_is_cached_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEXP_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        (built,) = list(tmp_path.rglob("libseparable.so"))
        stamp = os.stat(built).st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert os.stat(built).st_mtime_ns == stamp  # loaded from the cache, not rebuilt
        assert not [p for p in built.parent.iterdir() if p != built]  # no temporary left behind
    finally:
        native.library.cache_clear()


def _spectrum(params, k, sizes, native: bool):
    """The kernel spectrum by the C kernels, or as the pruned DFT of the separable PyTorch weight."""
    if native:
        return native_spectrum(tuple(params), k, sizes)
    return kernel_spectrum(torch_weight(tuple(params), k), sizes)


@needs_native
@pytest.mark.parametrize("d,sizes", [(3, (12, 14, 10)), (2, (12, 8))])
@pytest.mark.parametrize("cout,cin", [(3, 2), (17, 3)])  # one partial block per input channel; full + partial
def test_native_spectrum_is_the_kernels_conjugate_rfft(d, sizes, cout, cin):
    # csrc/spectrum_impl.h builds conj(rfftn(W zero-padded to sizes)) from the separable factors, without the
    # taps: it must equal torch.fft on the generated kernel (values), and the pruned-DFT path that the
    # fallback runs (values and gradients).
    params = _params(cout, cin, d, seed=5)
    got = _spectrum(params, 5, sizes, native=True)  # (2, F, cin, cout)
    weight = _weight(params, 5, native=False).detach()
    fft = (
        torch.fft.rfftn(weight, s=sizes, dim=tuple(range(2, 2 + d))).conj().resolve_conj()
    )  # (cout, cin, P_0.., nx)
    fft = torch.view_as_real(fft.flatten(2)).permute(3, 2, 1, 0)  # (re/im, F, cin, cout)
    torch.testing.assert_close(got, fft, rtol=1e-12, atol=1e-12)
    _same_values_and_gradients(got, _spectrum(params, 5, sizes, native=False), params)


@needs_native
def test_native_spectrum_gradcheck_and_float32_threads(monkeypatch):
    params = _params(18, 2, 3, seed=6)
    assert torch.autograd.gradcheck(
        lambda *p: _spectrum(p, 3, (4, 6, 4), native=True), params, fast_mode=True
    )
    want = _spectrum(params, 7, (14, 14, 14), native=False).detach()
    monkeypatch.setattr(native, "MIN_PER_THREAD", 8)  # 2 x 2 blocks over 3 threads: uneven ranges
    got = _on_threads(
        3, lambda: _spectrum([p.detach().float() for p in params], 7, (14, 14, 14), native=True)
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _stored_product(x, params, k, sizes):
    """The channel product with the spectrum of the taps (the PyTorch path: pruned DFT of expand_torch)."""
    return channel_product(x, _spectrum(params, k, sizes, native=False))


def _fused_product(x, params, k, sizes):
    return fused_product(x, tuple(params), k, sizes)


@needs_native
@pytest.mark.parametrize("d,sizes", [(3, (8, 10, 6)), (2, (12, 8))])
@pytest.mark.parametrize("cout,cin,tiles", [(3, 2, 1), (17, 3, 3)])  # partial blocks; full + partial
def test_native_spectral_product_equals_the_stored_spectrum_product(d, sizes, cout, cin, tiles):
    # csrc/spectral_impl.h builds each block of the kernel spectrum inside the channel product and never
    # stores it: values and gradients (input spectra and every parameter) must equal the product with the
    # spectrum computed from the taps.
    params = _params(cout, cin, d, seed=7)
    freqs = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
    x = torch.randn(freqs, tiles, cin, 2, dtype=torch.float64, requires_grad=True)
    got, want = _fused_product(x, params, 5, sizes), _stored_product(x, params, 5, sizes)
    _same_values_and_gradients(got, want, [x, *params])


@needs_native
def test_native_spectral_product_gradcheck_and_float32_threads(monkeypatch):
    params = _params(18, 2, 3, seed=8)
    x = torch.randn(4 * 6 * 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *p: _fused_product(x, p, 3, (4, 6, 4)), [x, *params], fast_mode=True
    )
    x = torch.randn(14 * 14 * 8, 1, 2, 2, dtype=torch.float64)
    want = _stored_product(x, params, 7, (14, 14, 14)).detach()
    monkeypatch.setattr(native, "MIN_PER_THREAD", 8)  # 14 rows of frequencies over 3 threads: uneven
    floats = [p.detach().float() for p in params]
    got = _on_threads(3, lambda: _fused_product(x.float(), floats, 7, (14, 14, 14)))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with pytest.raises(ValueError, match="do not match parameters"):
        _fused_product(x, [p.detach().float() for p in params], 7, (14, 14, 14))  # float64 x, float32 params


@needs_native
@pytest.mark.parametrize("d,cin", [(3, 32), (2, 48), (3, 19)])  # rows of 64-byte multiples; partial blocks
def test_streamed_weight_stores_write_the_same_weight(monkeypatch, d, cin):
    # Weights larger than the last-level cache are written with non-temporal stores (csrc put_row): the
    # same values, bit for bit, as the plain stores, in float32 and float64, on uneven thread ranges.
    params = _params(5, cin, d, seed=9)
    monkeypatch.setattr(native, "MIN_PER_THREAD", 16)
    for dtype in (torch.float32, torch.float64):
        typed = [p.detach().to(dtype) for p in params]
        plain = _on_threads(3, lambda t=typed: _weight(t, 7, native=True))
        with monkeypatch.context() as patch:
            patch.setattr(generate, "last_level_cache_bytes", lambda: 0)  # every weight "too large"
            streamed = _on_threads(3, lambda t=typed: _weight(t, 7, native=True))
        assert torch.equal(streamed, plain)


def test_largest_cache_is_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K"), ("index9", "?")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert generate.largest_cache_bytes(tmp_path) == 32 << 20
    assert generate.largest_cache_bytes(tmp_path / "missing") == 0
    assert generate.last_level_cache_bytes() > 0


def test_fused_gradient_pays_on_the_deepest_levels():
    # Products per tap, batch x prod over axes of sum over offsets r of (n - |r|)_+, against 512 per tap in
    # 3D (512 * 343 = 175616) and 48 in 2D (48 * 49 = 2352), 7 taps per axis (h = 3):
    # 4^3: 4 + 2 (3 + 2 + 1) = 16 per axis, 4096 per sample: up to batch 42;
    # 8^3: 8 + 2 (7 + 6 + 5) = 44 per axis, 85184 per sample: two, not three; 16^3: 100^3, never;
    # 2^3 with its reach 3: (1 + 2 + 1)^3 = 64 <= 512 * 27; 2D 8^2: 44^2 = 1936 for one image, not two.
    pays = gradient.fused_gradient_pays
    assert pays(42, (4, 4, 4), 7) and not pays(43, (4, 4, 4), 7)
    assert pays(2, (8, 8, 8), 7) and not pays(3, (8, 8, 8), 7)
    assert not pays(1, (16, 16, 16), 7)
    assert pays(8, (2, 2, 2), 3)
    assert pays(1, (8, 8), 7) and not pays(2, (8, 8), 7)


def _conv(x, params, k, bias, impl, fused: bool):
    """The direct convolution with the C-generated weight, its parameters' gradient fused or via dL/dW."""
    contiguous = impl == "direct_contiguous"
    if fused:
        return fused_gradient_conv(x, tuple(params), k, bias, contiguous)
    weight = native_weight(tuple(params), k, weight_channels_last(x, contiguous))
    return direct_conv(x, weight, bias, contiguous)


@needs_native
@pytest.mark.parametrize("d,spatial,k", [(3, (4, 4, 4), 7), (3, (3, 2, 4), 5), (2, (4, 5), 7)])
@pytest.mark.parametrize("impl", ["direct", "direct_contiguous"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_gabor_conv_equals_the_convolution_with_the_generated_weight(d, spatial, k, impl, channels_last):
    # fused_gradient_conv forms the parameters' gradient from x and the output gradient (csrc
    # gabor_conv_backward)
    # instead of from dL/dW: values and gradients (x, bias, every parameter) equal the convolution with the
    # generated weight; batch 2, full and partial blocks (cin 19), offsets reaching past non-cubic volumes.
    params = _params(3, 19, d, seed=10)
    x = torch.randn(2, 19, *spatial, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if d == 3 else torch.channels_last)
    x.requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    got, want = _conv(x, params, k, bias, impl, fused=True), _conv(x, params, k, bias, impl, fused=False)
    _same_values_and_gradients(got, want, [x, bias, *params])


@needs_native
def test_gabor_conv_gradcheck_float32_threads_and_bad_input(monkeypatch):
    params = _params(2, 17, 3, seed=11)
    x = torch.randn(1, 17, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *p: _conv(x, p, 3, None, "direct", fused=True), [x, *params], fast_mode=True
    )
    x = torch.randn(2, 17, 4, 4, 4, dtype=torch.float64)
    want = torch.autograd.grad(_conv(x, params, 7, None, "direct", fused=False).square().sum(), params)
    monkeypatch.setattr(native, "MIN_PER_THREAD", 8)  # 2 x 2 blocks over 3 threads: uneven ranges
    floats = [p.detach().float().requires_grad_() for p in params]
    loss = lambda: _conv(x.float(), floats, 7, None, "direct", fused=True).square().sum()  # noqa: E731
    got = _on_threads(3, lambda: torch.autograd.grad(loss(), floats))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    with pytest.raises(ValueError, match="do not match parameters"):
        _conv(x, floats, 7, None, "direct", fused=True)  # float64 x, float32 parameters
