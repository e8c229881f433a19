"""UNet and WongNet with every kernel kind and head, and the FFT input stage (Nair et al.)."""

from __future__ import annotations

import functools

import pytest
import torch

from medexp.nn.fft import FFTInput
from medexp.nn.gabor import GaborConv2d, GaborConv3d
from medexp.nn.heads import NeRDcHead, NeRDmHead, PlainHead
from medexp.nn.kernels import ConventionalKernels, GaborKernels, MixedKernels
from medexp.nn.unet import UNet
from medexp.nn.wong import WongNet

FACTORIES = {"conventional": ConventionalKernels, "gabor": GaborKernels, "mixed": MixedKernels}
KINDS = list(FACTORIES)
FFT = functools.partial(FFTInput, kernel_size=3)  # what conf/input_layer/fft.yaml builds
HEADS = {"plain": PlainHead, "nerdc": NeRDcHead, "nerdm": NeRDmHead}
TINY = (4, 8, 16)


def forward_backward(model: torch.nn.Module, x: torch.Tensor, num_classes: int) -> None:
    out = model(x)
    assert out.shape == (x.shape[0], num_classes, *x.shape[2:])
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head", list(HEADS))
def test_unet_kernels_and_heads(dims, kind, head):
    torch.manual_seed(0)
    model = UNet(2, 3, kernel=FACTORIES[kind](), head=HEADS[head], spatial_dims=dims, channels=TINY)
    forward_backward(model, torch.randn(2, 2, *([16] * dims)), 3)


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_mixed_levels_use_expected_kernels(dims):
    model = UNet(1, 2, kernel=MixedKernels(), spatial_dims=dims, channels=TINY)
    gabor = GaborConv3d if dims == 3 else GaborConv2d
    assert not any(isinstance(m, gabor) for m in [*model.encoder[0], *model.encoder[1], *model.decoder[0]])
    assert any(isinstance(m, gabor) for m in model.encoder[2])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["group", "batch", "instance"])
def test_unet_fft_input_and_norms(dims, norm):
    torch.manual_seed(0)
    model = UNet(1, 2, spatial_dims=dims, channels=TINY, input_layer=FFT, norm=norm, dropout=0.1)
    assert isinstance(model.input_layer, FFTInput)
    forward_backward(model, torch.randn(2, 1, *([16] * dims)), 2)
    assert model.input_layer.conv.weight.grad.abs().sum() > 0


def test_unet_of_nair_et_al_elu_no_norm_dropout_per_block():
    # Fig. 3 of Nair et al.: dropout 0.1 in c1, c2, c8, c9 and 0.2 in c3-c7 (c5 the bottleneck).
    model = UNet(
        1, 2, spatial_dims=2, activation="elu", norm="none", dropout=[0.1, 0.1, 0.2, 0.2, 0.2],
        dropout_mode="element",
    )  # fmt: skip
    blocks = [*model.encoder, *reversed(model.decoder)]  # c1 .. c9
    rates = [[m.p for m in b if isinstance(m, torch.nn.Dropout)] for b in blocks]
    assert rates == [[0.1], [0.1], [0.2], [0.2], [0.2], [0.2], [0.2], [0.1], [0.1]]
    modules = [type(m) for m in model.modules()]
    assert torch.nn.ELU in modules and torch.nn.ReLU not in modules
    assert not any(
        issubclass(t, (torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)) for t in modules
    )
    assert sum(t is torch.nn.ELU for t in modules) == 2 * 9, "an eLU after each of the 2 convs of 9 blocks"
    model.eval()
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(model(x), model(x)), "dropout off in eval"
    with pytest.raises(ValueError, match="one per level"):
        UNet(1, 2, spatial_dims=2, channels=TINY, dropout=[0.1, 0.2])
    with pytest.raises(ValueError, match="activation"):
        UNet(1, 2, spatial_dims=2, channels=TINY, activation="gelu")


def test_unet_pad_to_fit_odd_sizes_like_nerds_290x240():
    # 18 x 12 is not a multiple of 4 (3 levels): padded to 20 x 12 inside, output cropped back to 18 x 12;
    # the result equals running the padded image and cropping (the padding is zeros on both sides).
    torch.manual_seed(0)
    model = UNet(1, 2, spatial_dims=2, channels=TINY, pad_to_fit=True, norm="none").eval()
    x = torch.randn(1, 1, 18, 12)
    out = model(x)
    assert out.shape == (1, 2, 18, 12)
    padded = torch.nn.functional.pad(x, [0, 0, 1, 1])  # (1, 1, 20, 12)
    torch.testing.assert_close(out, model(padded)[:, :, 1:19])


def test_unet_default_channels_2d():
    model = UNet(2, 2, spatial_dims=2)  # NeRD's low-capacity U-Net: 16-32-64-128-256
    forward_backward(model, torch.randn(1, 2, 32, 32), 2)


def test_unet_contract():
    model = UNet(1, 2, spatial_dims=3, channels=TINY)
    with pytest.raises(ValueError, match=r"divisible by 4.*\(1, 1, 16, 16, 10\).*pad_to_fit"):
        model(torch.zeros(1, 1, 16, 16, 10))
    with pytest.raises(ValueError, match=r"\(1, 2, 16, 16, 16\)"):
        model(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        UNet(1, 2, norm="layer")
    with pytest.raises(ValueError, match="input_layer"):
        UNet(1, 2, input_layer="wavelet")


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("head", list(HEADS))
def test_wongnet_every_head(dims, head):
    torch.manual_seed(0)
    model = WongNet(
        1, 3, head=HEADS[head], spatial_dims=dims, channels=(4, 4, 8, 8, 8), convs_per_level=(1, 1, 1, 1, 1)
    )
    forward_backward(model, torch.randn(1, 1, *([16] * dims)), 3)


def test_wongnet_fft_input_and_gabor_3d():
    torch.manual_seed(0)
    model = WongNet(
        1,
        3,
        kernel=MixedKernels(),
        input_layer=FFT,
        channels=(4, 4, 8, 8, 8),
        convs_per_level=(1,) * 5,
    )
    forward_backward(model, torch.randn(1, 1, 16, 16, 16), 3)


@pytest.mark.parametrize("shape", [(2, 3, 12, 10), (2, 1, 8, 6, 10)])
def test_fft_input_near_identity_at_init(shape):
    torch.manual_seed(0)
    layer = FFTInput(in_channels=shape[1], spatial_dims=len(shape) - 2)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == x.shape and not y.is_complex()
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_fft_input_gradients_and_learnable(dims):
    torch.manual_seed(0)
    layer = FFTInput(in_channels=2, spatial_dims=dims)
    x = torch.randn(1, 2, *([8] * dims), requires_grad=True)
    target = torch.randn_like(x)
    (layer(x) - target).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert layer.conv.weight.grad.abs().sum() > 0 and layer.conv.bias.grad.abs().sum() > 0
    with torch.no_grad():  # a perturbed filter changes the output: the stage is not stuck at the identity
        layer.conv.weight.add_(0.1 * torch.randn_like(layer.conv.weight))
        assert (layer(x) - x).abs().max() > 1e-2


def test_fft_input_contract():
    with pytest.raises(ValueError, match=r"\(1, 2, 8, 8\)"):
        FFTInput(in_channels=1, spatial_dims=2)(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        FFTInput(in_channels=1, kernel_size=2)
