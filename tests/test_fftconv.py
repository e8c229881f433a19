"""The FFT convolution (medexp.nn.fast.fftconv) against F.conv{2,3}d for any weight: overlap-save tiles,
the pruned-DFT kernel spectrum, both channel-product arrangements, tile plans and the crop to the reach
of small volumes. The Gabor layers' use of it is tested against their reference in test_gabor_backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medexp.nn.fast import product
from medexp.nn.fast.backend import crop_to_reach
from medexp.nn.fast.direct import direct_conv
from medexp.nn.fast.fftconv import fft_conv, plan_tiles, tile_candidates
from medexp.nn.fast.spectrum import kernel_spectrum


def assert_close_scaled(got, want, rtol=2e-5):
    """Float32 agreement relative to the tensor's scale (FFT rounding spreads over all outputs)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.detach().abs().max()) + 1e-7)


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
    got = grads(lambda x, w, b: fft_conv(x, w, b, tile=tile), x, w, b)
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


@pytest.mark.parametrize("freqs, tiles, cin, cout", [(5, 1, 6, 4), (3, 7, 2, 3)])  # rows; block
def test_channel_product_arrangements_equal_the_complex_product(freqs, tiles, cin, cout):
    # Rows ([x_re; x_im] against w_re, w_im) and block ([[w_re, w_im], [-w_im, w_re]]) arrangements, and the
    # rule's pick between them, all give sum_i X[f, n, i] K[f, i, o] and its gradients w.r.t. the input
    # spectra and the kernel spectrum.
    torch.manual_seed(5)
    x = torch.randn(freqs, tiles, cin, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, freqs, cin, cout, dtype=torch.float64, requires_grad=True)

    def complex_product(x, w):
        y = torch.einsum("fni,fio->fno", torch.view_as_complex(x), torch.complex(w[0], w[1]))
        return torch.view_as_real(y)  # (F, T, cout, 2)

    def rows(x, w):
        return product._RowsProduct.apply(x.permute(0, 3, 1, 2).reshape(freqs, 2 * tiles, cin), w)

    def block(x, w):
        return product._BlockProduct.apply(x.reshape(freqs, tiles, 2 * cin), w).view(freqs, tiles, cout, 2)

    want = grads(complex_product, x, w)
    for arrangement in (rows, block, product.channel_product):
        for g, r in zip(grads(arrangement, x, w), want, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", ["direct", "direct_contiguous", "fft"])
@pytest.mark.parametrize("spatial", [(1, 1, 1), (2, 2, 2), (2, 5, 1), (3, 9)])
def test_small_volumes_need_only_the_taps_that_reach_them(conv, spatial):
    # On n voxels a 'same' 7-tap axis has only min(7, 2n - 1) taps that ever meet the volume: the cropped
    # convolution must equal the full 7^d one, values and gradients (the cropped taps' gradients are zero).
    torch.manual_seed(8)
    d = len(spatial)
    x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, *[7] * d, dtype=torch.float64, requires_grad=True)
    full = F.conv3d if d == 3 else F.conv2d
    want = grads(lambda a, b: full(a, b, padding=3), x, w)
    run = (
        fft_conv if conv == "fft" else lambda a, b: direct_conv(a, b, contiguous=conv == "direct_contiguous")
    )
    got = grads(lambda a, b: run(a, crop_to_reach(b, spatial)), x, w)
    assert crop_to_reach(w, spatial).shape[2:] == tuple(min(7, 2 * n - 1) for n in spatial)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_tile_candidates_for_timing():
    # Off the CPU's cost model the FFT times one tile per axis and tiles of ~2 and ~4 overlaps (k - 1 = 6).
    assert tile_candidates((64, 64, 64), (7, 7, 7)) == [12, 24, 70]
    assert tile_candidates((4, 4, 4), (7, 7, 7)) == [8]  # one tile of 8 >= 4 + 3 beats them all
