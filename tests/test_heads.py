"""Segmentation heads: plain 1x1 conv and the NeRD heads (Zhang et al.)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medexp.nn.heads import NeRDcHead, NeRDmHead, PlainHead, border_distances

HEADS = [PlainHead, NeRDcHead, NeRDmHead]


def randomise(module: nn.Module, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)
    return module


@pytest.mark.parametrize("head_cls", HEADS)
@pytest.mark.parametrize("spatial", [(6, 5), (4, 5, 3)])
def test_shapes_and_backward(head_cls, spatial):
    torch.manual_seed(0)
    head = head_cls(in_channels=7, num_classes=3, spatial_dims=len(spatial))
    x = torch.randn(2, 7, *spatial, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 3, *spatial)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_border_distances_2d_by_hand():
    v = border_distances((3, 5), torch.device("cpu"), torch.float32)  # (P, 4): top, right, bottom, left
    assert v.shape == (15, 4)
    torch.testing.assert_close(v[0], torch.tensor([0.0, 1.0, 1.0, 0.0]))  # top-left corner
    torch.testing.assert_close(v[4], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # top-right corner
    torch.testing.assert_close(v[7], torch.tensor([0.5, 0.5, 0.5, 0.5]))  # centre (row 1, col 2)
    torch.testing.assert_close(v[11], torch.tensor([1.0, 0.75, 0.0, 0.25]))  # row 2, col 1
    assert v.min() >= 0 and v.max() <= 1


def test_border_distances_3d_by_hand():
    v = border_distances((2, 3, 3), torch.device("cpu"), torch.float32)  # (P, 6)
    assert v.shape == (18, 6)
    torch.testing.assert_close(v[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(v[-1], torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(v[13], torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 0.5]))  # d=1, centre of slice
    single = border_distances((1, 4), torch.device("cpu"), torch.float32)
    assert torch.isfinite(single).all() and (single[:, [0, 2]] == 0).all()


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
@pytest.mark.parametrize("dims", [2, 3])
def test_nerd_starts_as_plain_classifier(head_cls, dims):
    """At init the NeRD heads equal a bias-free 1x1 classifier: the same at every position."""
    torch.manual_seed(0)
    head = head_cls(in_channels=5, num_classes=3, spatial_dims=dims)
    feature = torch.randn(5)
    x = feature.view(1, 5, *([1] * dims)).expand(1, 5, *([4] * dims)).contiguous()  # same vector everywhere
    out = head(x).reshape(3, -1)  # (1, K, *spatial) -> (K, P)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
@pytest.mark.parametrize("dims", [2, 3])
def test_nerd_is_position_dependent(head_cls, dims):
    head = randomise(head_cls(in_channels=5, num_classes=3, spatial_dims=dims), scale=0.5)
    feature = torch.randn(5)
    x = feature.view(1, 5, *([1] * dims)).expand(1, 5, *([6] * dims)).contiguous()
    out = head(x).reshape(3, -1)  # (K, P)
    assert (out[:, 0] - out[:, -1]).abs().max() > 1e-3  # corner vs opposite corner
    assert (out[:, 0] - out[:, out.shape[1] // 2]).abs().max() > 1e-3  # corner vs centre


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
def test_nerd_matches_per_position_formula(head_cls):
    """Against eqs. written out per position with the MLP output: NeRDm eq. 5, NeRDc s_v = W_v x_v."""
    head = randomise(head_cls(in_channels=4, num_classes=3, spatial_dims=2), scale=0.3)
    x = torch.randn(2, 4, 3, 5)
    out = head(x)  # (B, K, H, W)
    v = border_distances((3, 5), x.device, x.dtype)
    f = head.mlp(v)  # (P, 2C) or (P, K*C)
    feats = x.reshape(2, 4, 15)  # (B, C, P)
    for p in (0, 6, 14):
        if head_cls is NeRDmHead:
            inv_sigma, neg_mu = f[p, :4], f[p, 4:]
            expected = (feats[:, :, p] * inv_sigma + neg_mu) @ head.classifier.weight.reshape(3, 4).T
        else:
            expected = feats[:, :, p] @ f[p].reshape(3, 4).T  # W_v: (K, C)
        torch.testing.assert_close(out.reshape(2, 3, 15)[:, :, p], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_plain_head_is_translation_equivariant(dims):
    torch.manual_seed(0)
    head = PlainHead(in_channels=4, num_classes=3, spatial_dims=dims)
    x = torch.randn(1, 4, *([8] * dims))
    shift = (2,) * dims
    axes = tuple(range(2, 2 + dims))
    torch.testing.assert_close(head(torch.roll(x, shift, axes)), torch.roll(head(x), shift, axes))


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
def test_nerd_rejects_bad_input(head_cls):
    head = head_cls(in_channels=4, num_classes=3, spatial_dims=3)
    with pytest.raises(ValueError, match=r"\(2, 5, 4, 4, 4\)"):
        head(torch.zeros(2, 5, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 4\)"):
        head(torch.zeros(2, 4, 4, 4))


def test_nerd_positions_usable_after_inference_mode():
    head = NeRDmHead(in_channels=2, num_classes=2, spatial_dims=2)
    x = torch.randn(1, 2, 4, 4)
    with torch.inference_mode():
        head(x)
    head(x).sum().backward()  # the inference-mode cache entry must not leak into autograd


# --- chunking over positions (medexp.nn.chunks): the same values and gradients at the memory of one slab


def _upsample(level: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """What WongNet's deep supervision does to a decoder output: (tri/bi)linear, align_corners=False."""
    if tuple(level.shape[2:]) == size:
        return level
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return torch.nn.functional.interpolate(level, size=size, mode=mode, align_corners=False)


def _values_and_grads(head: nn.Module, inputs: list[torch.Tensor], run, grad: torch.Tensor):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    head.zero_grad(set_to_none=True)
    out = run(head, inputs)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs], [p.grad for p in head.parameters()]


def _assert_same(a, b, rtol: float, atol: float) -> None:
    """Values and gradients equal to float64 rounding: the same products, summed in another order (the
    parameters' gradients over slabs; a BLAS may also block a slab's matmul differently)."""
    for x, y in zip([a[0], *a[1], *a[2]], [b[0], *b[1], *b[2]], strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _pair(head_cls, channels: int, dims: int, slab_rows: int, spatial: tuple[int, ...], batch: int = 2):
    """(unchunked, chunked) heads with equal random parameters, in float64; the chunked one's budget holds
    `slab_rows` rows of the first spatial axis."""
    heads = []
    for chunk_bytes in (None, 1):
        head = randomise(head_cls(channels, 3, dims, chunk_bytes=chunk_bytes).double(), scale=0.3)
        heads.append(head)
    row = batch * math.prod(spatial[1:]) * heads[1].values_per_position() * 8
    heads[1].chunk_bytes = slab_rows * row
    return heads


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
@pytest.mark.parametrize("spatial", [(7, 4, 3), (9, 5)])
def test_chunked_head_equals_unchunked(head_cls, spatial):
    whole, chunked = _pair(head_cls, 5, len(spatial), slab_rows=2, spatial=spatial)
    assert len(chunked._slabs(2, spatial, 8)) == math.ceil(spatial[0] / 2)  # 2 rows a slab, the last 1
    torch.manual_seed(1)
    x, grad = torch.randn(2, 5, *spatial).double(), torch.randn(2, 3, *spatial).double()
    run = lambda head, inputs: head(inputs[0])  # noqa: E731
    _assert_same(
        _values_and_grads(chunked, [x], run, grad), _values_and_grads(whole, [x], run, grad), 1e-12, 1e-12
    )


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
@pytest.mark.parametrize(
    "size,levels",
    [
        ((16, 8, 12), [(2, 16, 8, 12), (3, 8, 4, 6), (2, 4, 2, 3), (1, 2, 1, 3)]),  # x1, x2, x4, x8
        ((16, 8), [(3, 16, 8), (2, 8, 4), (3, 2, 1)]),
    ],
)
def test_forward_levels_equals_head_on_upsampled_features(head_cls, size, levels):
    """head.forward_levels(levels, size) == head(cat(upsample(levels))) without building the features:
    each slab upsamples the rows it reads (exact for power-of-two factors)."""
    channels = sum(shape[0] for shape in levels)
    whole, chunked = _pair(head_cls, channels, len(size), slab_rows=3, spatial=size)
    torch.manual_seed(2)
    tensors = [torch.randn(2, *shape).double() for shape in levels]
    grad = torch.randn(2, 3, *size).double()
    on_features = lambda head, ts: head(torch.cat([_upsample(t, size) for t in ts], dim=1))  # noqa: E731
    by_levels = lambda head, ts: head.forward_levels(ts, size)  # noqa: E731
    expected = _values_and_grads(whole, tensors, on_features, grad)
    _assert_same(_values_and_grads(chunked, tensors, by_levels, grad), expected, 1e-12, 1e-12)
    _assert_same(_values_and_grads(whole, tensors, by_levels, grad), expected, 1e-12, 1e-12)  # one slab


@pytest.mark.parametrize("head_cls", [NeRDcHead, NeRDmHead])
def test_chunked_head_saves_only_its_input_for_backward(head_cls):
    """What autograd keeps between forward and backward: the chunked head only its input (parameters
    aside); the unchunked NeRDc at least its (B, K, J, P) projections."""
    whole, chunked = _pair(head_cls, 5, 3, slab_rows=1, spatial=(6, 4, 4))
    x = torch.randn(2, 5, 6, 4, 4, dtype=torch.float64, requires_grad=True)

    def saved_bytes(head: nn.Module) -> int:
        params = {p.untyped_storage().data_ptr() for p in head.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            head(x)
        return sum(seen.values())

    assert saved_bytes(chunked) == x.numel() * 8
    if head_cls is NeRDcHead:
        assert saved_bytes(whole) >= 2 * 3 * 32 * 96 * 8  # (B, K, J, P) in float64


def test_nerd_chunk_bytes_must_be_positive():
    with pytest.raises(ValueError, match="chunk_bytes"):
        NeRDcHead(4, 3, 3, chunk_bytes=0)
