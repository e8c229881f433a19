"""The paper's network (docs/design.md §4): parameter counts of Wong & Moradi and the input contract."""

import pytest
import torch

from medexp.nn.heads import NeRDcHead, NeRDmHead
from medexp.nn.kernels import ConventionalKernels, MixedKernels
from medexp.nn.wong import WongNet


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("conv_size", "expected"), [(3, 4_989_812), (5, 22_842_668)])
def test_conventional_parameter_counts_match_paper(conv_size, expected):
    # Paper: 4.99M (3^3) and 22.84M (5^3), 1 input channel, 19 labels + background.
    model = WongNet(in_channels=1, num_classes=20, kernel=ConventionalKernels(conv_size=conv_size))
    assert count(model) == expected


def test_forward_shape_3d_and_2d():
    model = WongNet(in_channels=2, num_classes=3, dropout=0.0)
    assert model(torch.randn(1, 2, 16, 32, 16)).shape == (1, 3, 16, 32, 16)
    model2d = WongNet(in_channels=1, num_classes=4, spatial_dims=2)
    assert model2d(torch.randn(2, 1, 32, 48)).shape == (2, 4, 32, 48)


def test_bad_spatial_size_names_shape():
    with pytest.raises(ValueError, match=r"divisible by 16.*\(1, 1, 20, 16, 16\)"):
        WongNet(in_channels=1, num_classes=2)(torch.randn(1, 1, 20, 16, 16))


def test_mixed_kernel_factory_levels():
    factory = MixedKernels()
    assert [factory.kind_at(level) for level in range(5)] == ["conventional"] * 2 + ["gabor"] * 3


class _OpaqueHead(torch.nn.Module):
    """The same 1x1 convolution, but not a PlainHead: WongNet gives it the concatenated features."""

    def __init__(self, plain: torch.nn.Module) -> None:
        super().__init__()
        self.conv = plain.conv

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


@pytest.mark.parametrize("spatial_dims, shape", [(3, (2, 1, 16, 16, 32)), (2, (2, 1, 32, 48))])
def test_plain_head_per_level_equals_head_on_concatenated_features(spatial_dims, shape):
    # The fast path (1x1 head per decoder level, then upsample) against the definition (upsample every
    # level, concatenate 180 channels, then the 1x1 head), forward and backward.
    torch.manual_seed(0)
    model = WongNet(1, 5, spatial_dims=spatial_dims, dropout=0.0).double()
    x = torch.randn(shape, dtype=torch.float64)
    fast = model(x)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(model.parameters()))
    model.head = _OpaqueHead(model.head)
    reference = model(x)
    reference_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()))
    assert fast.shape == (shape[0], 5, *shape[2:])
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    for got, want in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
def test_nerd_heads_read_the_decoder_levels_and_equal_the_concatenated_features(head_cls, monkeypatch):
    # WongNet hands NeRD heads the decoder outputs (forward_levels, which never builds the 180-channel
    # full-size features); the result must equal the head on the upsampled, concatenated features.
    torch.manual_seed(0)
    model = WongNet(1, 3, head=head_cls, channels=(4, 4, 8, 8, 8), convs_per_level=(1,) * 5, dropout=0.0)
    model = model.double()
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    got = model(x)
    owner = next(c for c in head_cls.__mro__ if "forward_levels" in vars(c))
    monkeypatch.delattr(owner, "forward_levels")
    torch.testing.assert_close(got, model(x), rtol=1e-12, atol=1e-12)
