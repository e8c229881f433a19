"""Every fast way of computing a Gabor layer (medexp.nn.fast) against the definition, impl "reference":
F.conv{2,3}d(x, layer.weight(), bias, padding=k // 2) with the weight of eq. 2 as written in
medexp.nn.gabor. Values and gradients w.r.t. the input, the bias and every parameter, 2D and 3D, float64
tight and float32 looser; a change of eq. 2 in gabor_kernel3d that a backend does not follow fails here."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from medexp.nn import fast
from medexp.nn.fast import backend, gradient, native
from medexp.nn.fast.fftconv import tile_candidates
from medexp.nn.gabor import GaborConv2d, GaborConv3d

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler")

# name -> (impl, C kernels, fused gradient, fused spectral product): every path behind the door
VARIANTS = {
    "direct": ("direct", True, False, False),
    "direct, fused gradient": ("direct", True, True, False),
    "direct_contiguous": ("direct_contiguous", True, False, False),
    "direct_contiguous, fused gradient": ("direct_contiguous", True, True, False),
    "fft, stored spectrum": ("fft", True, False, False),
    "fft, fused product": ("fft", True, False, True),
    "direct, no C kernels": ("direct", False, False, False),
    "direct_contiguous, no C kernels": ("direct_contiguous", False, False, False),
    "fft, no C kernels": ("fft", False, False, False),
}
# the functions each variant must run (spied on in medexp.nn.fast.backend)
RUNS = {
    "direct": "native_weight",
    "direct, fused gradient": "fused_gradient_conv",
    "direct_contiguous": "native_weight",
    "direct_contiguous, fused gradient": "fused_gradient_conv",
    "fft, stored spectrum": "native_spectrum",
    "fft, fused product": "fused_product",
    "direct, no C kernels": "generate",
    "direct_contiguous, no C kernels": "generate",
    "fft, no C kernels": "kernel_spectrum",
}


@pytest.fixture
def calls(monkeypatch):
    """Counts of the backend's generation and product functions called (they still run)."""
    counts = collections.Counter()
    for name in set(RUNS.values()):
        function = getattr(backend, name)

        def spy(*args, _function=function, _name=name, **kwargs):
            counts[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(backend, name, spy)
    return counts


def use_variant(monkeypatch, name: str) -> str:
    """Force the variant's path (C kernels on or off, fused gradient and fused product on or off)."""
    impl, c_kernels, fused_gradient, fused_product = VARIANTS[name]
    if c_kernels and native.library() is None:
        pytest.skip("no C compiler")
    if not c_kernels:
        monkeypatch.setattr(native, "available", lambda t: False)
    limit = math.inf if fused_gradient else -1
    monkeypatch.setattr(gradient, "FUSED_GRAD_MAX_PER_TAP", {2: limit, 3: limit})
    monkeypatch.setattr(backend, "FUSED_MAX_TILES", 10**6 if fused_product else 0)
    return impl


def make_layer(d: int, dtype: torch.dtype, cin: int = 3, cout: int = 4, k: int = 7, seed: int = 0):
    """A Gabor layer with every parameter moved off its initial range, so every one of them matters."""
    torch.manual_seed(seed)
    layer = (GaborConv3d if d == 3 else GaborConv2d)(cin, cout, k).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def outputs_and_grads(layer, x, impl: str):
    """The output and its gradients w.r.t. x, the bias and every parameter for one fixed output gradient."""
    layer.impl = impl
    x = x.detach().requires_grad_()
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    names = ["x", *(name for name, _ in layer.named_parameters())]
    return out, dict(zip(names, torch.autograd.grad(out, [x, *layer.parameters()], g), strict=True))


def assert_matches_reference(layer, x, impl: str, rtol: float) -> torch.Tensor:
    """`impl` gives the reference's output and gradients, each to rtol of its own scale; returns the output
    (and leaves layer.used_impl as `impl` ran it)."""
    out, grads = outputs_and_grads(layer, x, impl)
    ran = layer.used_impl
    want, want_grads = outputs_and_grads(layer, x, "reference")
    assert out.dtype == want.dtype and out.shape == want.shape
    if x.dtype == torch.float32:  # the layout F.conv gives (in float64 oneDNN returns contiguous)
        assert out.is_contiguous(memory_format=fast.backend.format_of(want))
    for name, got in {"output": out, **grads}.items():
        expected = want if name == "output" else want_grads[name]
        scale = float(expected.detach().abs().max())
        torch.testing.assert_close(
            got, expected, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    layer.impl, layer.used_impl = impl, ran
    return out


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("d", [3, 2])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_backend_equals_the_reference(variant, d, dtype, rtol, layout, calls, monkeypatch):
    impl = use_variant(monkeypatch, variant)
    layer = make_layer(d, dtype)
    x = torch.randn(2, 3, *((5, 6, 7) if d == 3 else (9, 11)), dtype=dtype)
    x = channels_last(x) if layout == "channels_last" else x
    out = assert_matches_reference(layer, x, impl, rtol)
    assert layer.used_impl == impl
    assert calls[RUNS[variant]] > 0, (variant, dict(calls))  # the variant's own path ran
    if "fused gradient" in variant:
        assert "FusedGradientConv" in type(out.grad_fn).__name__


@needs_native
@pytest.mark.parametrize("impl", ["direct", "direct_contiguous"])
def test_direct_forms_the_parameters_gradient_without_dl_dw_on_small_volumes_only(impl):
    # Training on 4^3 voxels (batch 2: 24 products per tap) the direct paths form the parameters' gradient
    # from x and dL/dy; on 16^3 (5831 per tap, above the limit of fused_gradient_pays) through dL/dW. Both
    # ways give the reference's output and gradients.
    layer = make_layer(3, torch.float64, cin=18, cout=3, seed=2)
    for n, fused in ((4, True), (16, False)):
        x = channels_last(torch.randn(2, 18, n, n, n, dtype=torch.float64))
        out = assert_matches_reference(layer, x, impl, 1e-10)
        assert ("FusedGradientConv" in type(out.grad_fn).__name__) == fused


@pytest.mark.parametrize("cls, shape", [(GaborConv3d, (2, 3, 7, 6, 5)), (GaborConv2d, (2, 3, 11, 9))])
def test_auto_equals_the_reference_and_says_what_ran(cls, shape, monkeypatch):
    monkeypatch.setattr(backend, "_AUTO_CHOICE", {})
    layer = make_layer(len(shape) - 2, torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    assert_matches_reference(layer, channels_last(x), "auto", 1e-10)
    assert layer.used_impl in set(fast.IMPLS) - {"auto", "reference"}
    assert layer.used_impl in backend.auto_choices().values()


@pytest.mark.parametrize("impl", ["direct", "direct_contiguous", "fft"])
def test_volumes_smaller_than_the_kernel_use_only_the_taps_that_reach_them(impl):
    # On n voxels a 'same' 7-tap axis has only min(7, 2n - 1) taps that ever meet the volume: generated
    # (or transformed) alone, per axis for (2, 5, 1), they give the reference's values and gradients.
    layer = make_layer(3, torch.float64, seed=9)
    for shape in ((1, 1, 1), (2, 2, 2), (3, 3, 3), (2, 5, 1)):
        assert_matches_reference(layer, torch.randn(2, 3, *shape, dtype=torch.float64), impl, 1e-10)


AUTOCAST_IMPLS = ["reference", "direct", "direct_contiguous", "fft", "auto"]


@pytest.mark.parametrize("impl", AUTOCAST_IMPLS)
@pytest.mark.parametrize("fused", [False, True])  # the C kernels' fused gradient and product where on
def test_every_impl_runs_under_cpu_bfloat16_autocast(impl, fused, monkeypatch):
    # Under autocast a Gabor layer computes in float32 and hands back bfloat16, as F.conv would. Forward
    # under autocast, backward outside (PyTorch's recommendation) from a bfloat16 output gradient: the
    # output and every gradient within 1% of their scale of the float32 result (bfloat16 keeps 8 bits).
    monkeypatch.setattr(backend, "_AUTO_CHOICE", {})
    monkeypatch.setattr(
        gradient, "FUSED_GRAD_MAX_PER_TAP", {2: math.inf, 3: math.inf} if fused else {2: -1, 3: -1}
    )
    monkeypatch.setattr(backend, "FUSED_MAX_TILES", 10**6 if fused else 0)
    for d, shape in ((3, (2, 3, 6, 5, 7)), (2, (2, 3, 12, 10))):
        layer = make_layer(d, torch.float32)
        x = channels_last(torch.randn(shape))
        want, want_grads = outputs_and_grads(layer, x, "reference")
        layer.impl = impl
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xs)
        assert out.dtype == torch.bfloat16
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, [xs, *layer.parameters()], g.to(out.dtype))
        for name, got, expected in zip(want_grads, grads, want_grads.values(), strict=True):
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(
                got, expected, rtol=0.01, atol=0.01 * float(expected.detach().abs().max())
            )
        torch.testing.assert_close(out.float(), want, rtol=0.01, atol=0.01 * float(want.detach().abs().max()))


def test_weight_or_spectrum_is_kept_in_evaluation_only(monkeypatch):
    monkeypatch.setattr(backend, "FUSED_MAX_TILES", 0)  # fft with the stored (hence keepable) spectrum
    layer = make_layer(3, torch.float32, cin=2, cout=3, k=5, seed=6)
    layer.impl = "direct"
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():
        layer(x)
        key, first = backend._KEPT[layer]
        assert key[0] == "weight" and layer(x) is not None and backend._KEPT[layer][1] is first
        torch.testing.assert_close(first, layer.weight(), rtol=1e-5, atol=1e-6)
        layer.psi.add_(0.1)  # an in-place update (optimiser step) bumps the version counter
        layer(x)
        second = backend._KEPT[layer][1]
        assert second is not first and not torch.equal(second, first)
        layer.impl = "fft"
        torch.testing.assert_close(layer(x), layer.reference(x), rtol=1e-4, atol=1e-5)
        key, spectrum = backend._KEPT[layer]  # one tensor per layer: the spectrum replaced the weight
        assert key[0] == "spectrum" and spectrum.shape[0] == 2
    layer(x).sum().backward()  # training: nothing kept
    assert layer not in backend._KEPT


def test_auto_is_timed_once_per_key(monkeypatch):
    timed = []
    monkeypatch.setattr(backend, "_AUTO_CHOICE", {})

    def fake_timings(runs, inputs, device):
        timed.append((sorted(runs), bool(inputs)))
        return {name: 1.0 if name == "direct" else 0.5 for name in runs}

    monkeypatch.setattr(backend, "_timings", fake_timings)
    layer = GaborConv3d(2, 3, 7)
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert layer(x) is not None and layer(x) is not None and layer.used_impl == "fft"
    assert timed == [(["direct", "fft"], False)]  # once, forward only, no direct_contiguous (contiguous x)
    layer(channels_last(x)).sum().backward()  # grad mode and layout are in the key
    assert timed[1] == (["direct", "direct_contiguous", "fft"], True)
    monkeypatch.setattr(backend, "_timings", lambda *a: {"direct": 1.0, "fft": 0.95})
    monkeypatch.setattr(backend, "_AUTO_CHOICE", {})
    layer(x)
    assert layer.used_impl == "direct"  # 5% faster is within MARGIN: direct stays
    small = GaborConv3d(2, 3, 3)
    small(x)
    assert small.used_impl == "direct"  # 27-tap kernels are never timed


def test_auto_timing_runs_for_real():
    layer = GaborConv3d(2, 3, 7)
    x = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.used_impl in ("direct", "fft")
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_fft_tile_is_timed_off_the_cost_models_devices(monkeypatch):
    # On devices without the CPU-fitted cost model (any but CPU) the FFT times a few tile plans once per
    # shape; forced here on CPU, it must pick one of them and give the reference's result.
    monkeypatch.setattr(backend, "COST_MODEL_DEVICES", ())
    monkeypatch.setattr(backend, "_TILE_CHOICE", {})
    layer = make_layer(3, torch.float64)
    x = torch.randn(1, 3, 20, 9, 9, dtype=torch.float64)
    assert_matches_reference(layer, x, "fft", 1e-10)
    (tile,) = backend._TILE_CHOICE.values()
    assert tile in tile_candidates((20, 9, 9), (7, 7, 7)) and len(tile_candidates((20, 9, 9), (7, 7, 7))) > 1


def test_bad_impl_names_the_allowed_values():
    assert fast.IMPLS[0] == "auto" and {"reference", "direct", "fft"} <= set(fast.IMPLS)
    with pytest.raises(
        ValueError, match="one of auto, reference, direct, direct_contiguous, fft, got 'gemm'"
    ):
        GaborConv3d(2, 3, impl="gemm")
    layer = GaborConv3d(2, 3)
    layer.impl = "winograd"
    with pytest.raises(ValueError, match="one of auto, reference"):
        layer(torch.zeros(1, 2, 4, 4, 4))


@needs_native
def test_c_kernels_run_only_on_cpu_in_float32_or_float64():  # never for CUDA tensors
    assert native.available(torch.zeros(1)) and not native.available(torch.zeros(1, device="meta"))
    assert not native.available(torch.zeros(1, dtype=torch.bfloat16))
