"""Segmentation heads: map backbone features (B, C, *spatial) to class scores (B, K, *spatial).

`plain` is the 1x1(x1) convolution of Wong & Moradi. Every head is built as
`head(in_channels=C, num_classes=K, spatial_dims=2|3)`, so the `head` config group is a partial.

Output stage (`head.output`, docs/design.md §6): "linear" (default) returns the scores as logits, turned
into probabilities by a softmax over K; "mlp_sigmoid" is NeRD Sec. 2.2's "another MLP and a Sigmoid": the
scores go through a per-position MLP (K -> head.output_hidden -> K) and a sigmoid per class, and the head
returns those probabilities in (0, 1) (pair it with a loss that takes probabilities: `loss.softmax=false`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medexp.nn import chunks
from medexp.nn.kernels import conv_nd

OUTPUTS = ("linear", "mlp_sigmoid")  # head.output
DEFAULT_OUTPUT_HIDDEN = (16,)  # ours, as conf/head/*.yaml: NeRD gives the output MLP no width


class SigmoidMLPOutput(nn.Module):
    """NeRD's output stage (Sec. 2.2: "The final segmentation can be obtained with another MLP and a
    Sigmoid function"): p_v = sigmoid(MLP(s_v)) at every position v, one probability per class.

    The MLP is 1x1(x1) convolutions K -> hidden... -> K with ReLU between them (a per-position MLP, so it
    stays translation-equivariant); its widths and initialisation (PyTorch's default) are ours: the paper
    gives neither, nor whether the first stage's scores are K wide (our reading: eq. 5 "normalize and
    classify" gives the K scores s_v, then this MLP).
    """

    def __init__(self, num_classes: int, spatial_dims: int, hidden: Sequence[int] = DEFAULT_OUTPUT_HIDDEN):
        super().__init__()
        widths = [num_classes, *(int(h) for h in hidden), num_classes]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [conv_nd(spatial_dims)(a, b, kernel_size=1, bias=True), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*layers[:-1])  # no ReLU after the last layer

    def forward(self, scores: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(scores))  # (B, K, *spatial), each in (0, 1)


def output_stage(
    output: str, num_classes: int, spatial_dims: int, hidden: Sequence[int] = DEFAULT_OUTPUT_HIDDEN
) -> nn.Module:
    """The module a head applies to its scores: nn.Identity ("linear") or SigmoidMLPOutput."""
    if output not in OUTPUTS:
        raise ValueError(f"head.output={output!r}: expected one of {', '.join(OUTPUTS)}")
    return nn.Identity() if output == "linear" else SigmoidMLPOutput(num_classes, spatial_dims, hidden)


def outputs_probabilities(model: nn.Module) -> bool:
    """Whether `model`'s head returns per-class sigmoid probabilities (head.output=mlp_sigmoid) rather
    than logits: argmax works on either, a softmax only on logits."""
    return any(isinstance(m, SigmoidMLPOutput) for m in model.modules())


class PlainHead(nn.Module):
    """s_v = W x_v + b at every position v: a 1x1(x1) convolution with bias (translation-equivariant),
    followed by the output stage (`output`: "linear" adds nothing; "mlp_sigmoid", SigmoidMLPOutput).

    A PlainHead with output "mlp_sigmoid" is built as its subclass PlainSigmoidHead, so that code that
    recognises the linear plain head by its type (WongNet applies its conv per decoder level) never
    bypasses the output stage.
    """

    def __new__(cls, *args, output: str = "linear", **kwargs):
        if cls is PlainHead and output != "linear":
            cls = PlainSigmoidHead
        return super().__new__(cls)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 3,
        output: str = "linear",
        output_hidden: Sequence[int] = DEFAULT_OUTPUT_HIDDEN,
    ) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims)(in_channels, num_classes, kernel_size=1, bias=True)
        self.output = output
        self.output_stage = output_stage(output, num_classes, spatial_dims, output_hidden)

    def forward(self, features: Tensor) -> Tensor:
        return self.output_stage(self.conv(features))  # (B, K, *spatial)


class PlainSigmoidHead(PlainHead):
    """PlainHead with NeRD's MLP + sigmoid output stage (see PlainHead)."""


# --- NeRD heads (Zhang et al., "NeRD: Neural Representation of Distribution for Medical Image Segmentation")
#
# The paper gives the idea (eqs. 4-5 and the pixel-aligned classifier of its Sec. 2.2) but no MLP depth,
# width or initialisation, and its code is not available to us; the choices below are ours, stated where made.

# Our choice, as conf/head/nerd*.yaml: a smooth function of 4 or 6 coordinates needs little capacity.
DEFAULT_HIDDEN = (32, 32)


def border_distances(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position vectors v: the distance of every position to every image border, normalised to [0, 1].

    Order of the components (NeRD Sec. 2.1 for 2D): 2D (top, right, bottom, left) for an (H, W) grid;
    3D (front, back, top, right, bottom, left) for a (D, H, W) grid, front/back being the first and last
    slice along D. Position i along an axis of size n is at distance i / (n - 1) from the start border and
    (n - 1 - i) / (n - 1) from the end border (0 for both when n == 1). Cached per shape/device/dtype;
    treat the result as read-only.

    Args:
        shape: spatial shape (H, W) or (D, H, W).

    Returns:
        (P, 2 * len(shape)) tensor, P = prod(shape), positions in row-major (C) order like Tensor.flatten.
    """
    if len(shape) not in (2, 3):
        raise ValueError(f"border_distances needs a 2D or 3D spatial shape, got {shape}")
    # Inference-mode tensors cannot enter autograd later, so they get their own cache entries.
    return _border_distances(tuple(int(n) for n in shape), device, dtype, torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=16)
def _border_distances(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, inference: bool
) -> Tensor:
    index = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    grids = torch.meshgrid(*index, indexing="ij")  # each (*shape): the index along one axis
    # per axis: (distance to the start border, distance to the end border), each (P,)
    start_end = [
        (g.reshape(-1) / max(n - 1, 1), (n - 1 - g.reshape(-1)) / max(n - 1, 1))
        for g, n in zip(grids, shape, strict=True)
    ]
    *depth, (top, bottom), (left, right) = start_end
    parts = [*(depth[0] if depth else ()), top, right, bottom, left]  # 3D: front, back first
    return torch.stack(parts, dim=1)  # (P, 2 * len(shape))


def _mlp(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """Linear-ReLU stack; the last Linear is returned un-activated and initialised by the caller."""
    widths = [in_features, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(widths[-1], out_features))


def _check_features(head: nn.Module, features: Tensor) -> None:
    if features.dim() != head.spatial_dims + 2 or features.shape[1] != head.in_channels:
        raise ValueError(
            f"{type(head).__name__} expects features (B, {head.in_channels}, *spatial) with "
            f"{head.spatial_dims} spatial dims, got shape {tuple(features.shape)}"
        )


# Our choice: the per-chunk intermediates of a NeRD head stay under this many bytes (forward; the backward
# holds about twice that while it recomputes a chunk). At 128^3 with C = 180, K = 20, J = 32 that is 4 slabs
# of 128 x 128 positions for NeRDc and 3 for NeRDm.
DEFAULT_CHUNK_BYTES = 256 * 2**20


class _NeRDHead(nn.Module):
    """Common part of the NeRD heads: the position MLP f(v), the input contract, and the evaluation of the
    scores chunk by chunk over positions.

    A NeRD head's per-position intermediates are large: (B, K, J, P) for NeRDc, several (B, C, P) tensors
    for NeRDm, against the (B, K, P) scores. When they would exceed `chunk_bytes`, positions are processed
    in slabs of the first spatial axis and no slab's intermediates are kept for backward: the backward
    recomputes one slab at a time (medexp.nn.chunks). The same computation, equal to float rounding (the
    parameters' gradients are summed slab by slab). The output stage (`output`, SigmoidMLPOutput) acts
    on the (B, K, *spatial) scores after all slabs.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int,
        hidden: Sequence[int],
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        output: str = "linear",
        output_hidden: Sequence[int] = DEFAULT_OUTPUT_HIDDEN,
    ) -> None:
        super().__init__()
        self.output = output
        self.output_stage = output_stage(output, num_classes, spatial_dims, output_hidden)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if chunk_bytes is not None and chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive number of bytes or None, got {chunk_bytes}")
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, spatial_dims
        self.hidden = tuple(int(h) for h in hidden)
        self.chunk_bytes = chunk_bytes

    def positions(self, features: Tensor) -> Tensor:
        """(P, 2 * spatial_dims) border distances of the feature map's positions."""
        return border_distances(tuple(features.shape[2:]), features.device, features.dtype)

    def values_per_position(self) -> int:
        """Intermediate values one position of one image costs (for the chunk size)."""
        raise NotImplementedError

    def slab_scores(self, features: Tensor, positions: Tensor) -> Tensor:
        """Scores (B, K, n, *rest) of a slab of features (B, C, n, *rest) whose positions (in row-major
        order) have the border distances `positions` (n * prod(rest), 2 * spatial_dims)."""
        raise NotImplementedError

    def _slabs(self, batch: int, spatial: Sequence[int], element_size: int) -> list[tuple[int, int]]:
        row = batch * math.prod(spatial[1:]) * self.values_per_position() * element_size
        return chunks.slab_ranges(spatial[0], row, self.chunk_bytes)

    def _scores_of(self, positions: Tensor, spatial: Sequence[int]):
        plane = math.prod(spatial[1:])  # positions per row of the first spatial axis (row-major order)
        return lambda features, a, b: self.slab_scores(features, positions[a * plane : b * plane])

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, *spatial) features -> (B, K, *spatial) logits (probabilities with output="mlp_sigmoid")."""
        return self.output_stage(self._scores(features))

    def _scores(self, features: Tensor) -> Tensor:
        """(B, C, *spatial) features -> (B, K, *spatial) scores s_v (NeRD eq. 5 or the NeRDc classifier)."""
        _check_features(self, features)
        positions = self.positions(features)  # (P, 2 * spatial_dims)
        spatial = features.shape[2:]
        slabs = self._slabs(features.shape[0], spatial, features.element_size())
        if len(slabs) == 1:
            return self.slab_scores(features, positions)
        params = [p for p in self.parameters() if p.requires_grad]
        scores_of = self._scores_of(positions, spatial)
        return chunks.slab_scores(scores_of, chunks.Rows(), [features], slabs, params)

    def forward_levels(self, levels: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """The scores of deep-supervision features without building them: equal to
        self(torch.cat([upsample(level, size) for level in levels], dim=1)), (bi/tri)linear upsampling with
        align_corners=False as medexp.nn.wong.WongNet builds its features. Each chunk of positions upsamples
        the rows of each level it reads (medexp.nn.chunks.Upsampled), so neither the full-size features
        (C x P) nor their gradient are ever held; exact for power-of-two factors, else the features are
        built and passed to forward.

        Args:
            levels: (B, C_l, *spatial_l) tensors, sum of C_l = in_channels.
            size: the full spatial size.
        """
        size = tuple(int(s) for s in size)
        if not chunks.Upsampled.exact(levels, size):
            return self(chunks.Upsampled(levels, size).features(list(levels), 0, size[0]))
        first = levels[0]
        channels = sum(lv.shape[1] for lv in levels)
        if channels != self.in_channels or len(size) != self.spatial_dims:
            raise ValueError(
                f"{type(self).__name__}.forward_levels expects levels (B, C_l, *spatial) with "
                f"{self.spatial_dims} spatial dims and C_l summing to {self.in_channels}, got shapes "
                f"{[tuple(lv.shape) for lv in levels]} and size {size}"
            )
        positions = border_distances(size, first.device, first.dtype)  # (P, 2 * spatial_dims)
        slabs = self._slabs(first.shape[0], size, first.element_size())
        params = [p for p in self.parameters() if p.requires_grad]
        source = chunks.Upsampled(levels, size)
        scores = chunks.slab_scores(self._scores_of(positions, size), source, list(levels), slabs, params)
        return self.output_stage(scores)


class NeRDmHead(_NeRDHead):
    """NeRDm: per-position feature normalisation predicted from the position, then a shared classifier.

    s_v = W (x_v * 1/sigma(v) + (-mu(v)/sigma(v)))   (NeRD eq. 5), W: (K, C) shared, no bias;
    f(v) -> (1/sigma(v), -mu(v)/sigma(v)), each C values, is an MLP of the border distances v.

    Initialisation (ours): the MLP's last layer has zero weights and bias (1, ..., 1, 0, ..., 0), so at start
    1/sigma = 1 and -mu/sigma = 0 everywhere and the head is exactly the plain 1x1 classifier without bias;
    the position dependence is learnt from there.

    Args:
        in_channels: C, backbone feature channels.
        num_classes: K.
        spatial_dims: 2 or 3.
        hidden: widths of the MLP's hidden layers.
        chunk_bytes: largest size of the per-chunk intermediates (`_NeRDHead`); None: never chunk.
        output: "linear" (scores as logits) or "mlp_sigmoid" (NeRD Sec. 2.2's MLP + sigmoid, probabilities).
        output_hidden: widths of the output MLP's hidden layers (ours; the paper gives none).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 3,
        hidden: Sequence[int] = DEFAULT_HIDDEN,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        output: str = "linear",
        output_hidden: Sequence[int] = DEFAULT_OUTPUT_HIDDEN,
    ) -> None:
        super().__init__(in_channels, num_classes, spatial_dims, hidden, chunk_bytes, output, output_hidden)
        self.mlp = _mlp(2 * spatial_dims, self.hidden, 2 * in_channels)
        self.classifier = conv_nd(spatial_dims)(in_channels, num_classes, kernel_size=1, bias=False)
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.cat([torch.ones(in_channels), torch.zeros(in_channels)]))

    def values_per_position(self) -> int:
        # MLP activations, (P, 2C) stats and their (2C, P) copy, the normalised features and their sum
        return sum(self.hidden) + 6 * self.in_channels + self.num_classes

    def slab_scores(self, features: Tensor, positions: Tensor) -> Tensor:
        spatial = features.shape[2:]
        stats = self.mlp(positions)  # (P, 2C)
        # (P, 2C) -> (2C, P) -> (2C, *spatial): broadcasts over the batch
        stats = stats.transpose(0, 1).reshape(2 * self.in_channels, *spatial)
        inv_sigma, neg_mu_over_sigma = stats.chunk(2, dim=0)  # each (C, *spatial)
        return self.classifier(features * inv_sigma + neg_mu_over_sigma)  # (B, K, *spatial)


class NeRDcHead(_NeRDHead):
    """NeRDc: a per-position linear classifier W_v (K x C) predicted by an MLP of the position.

    s_v = W_v x_v with W_v = f(v)  (NeRD Sec. 2.2, "pixel-aligned classifier"), no bias.

    Computation: with h_v the last hidden activation of f (J values) and the last layer W_v = A h_v + b
    (A: (K, C, J), b: (K, C)), s_v = sum_j h_v[j] (A[:, :, j] x_v) + b x_v. The first term is a 1x1 conv to
    K*J channels weighted by h_v, so the largest intermediate is (B, K, J, P) instead of the (P, K, C) stack
    of per-position matrices W_v; all terms are evaluated with einsum. Positions go in chunks (`_NeRDHead`),
    so at 128^3 (K = 20, J = 32: 5.4 GB in float32) the (B, K, J, P) tensor is never built whole.

    Initialisation (ours): A = 0 and b = a default nn.Conv 1x1 weight, so the head starts as the plain
    classifier without bias and learns the position dependence from there.

    Args:
        in_channels: C, backbone feature channels.
        num_classes: K.
        spatial_dims: 2 or 3.
        hidden: widths of the MLP's hidden layers (at least one; the last one is J).
        chunk_bytes: largest size of the per-chunk intermediates (`_NeRDHead`); None: never chunk.
        output: "linear" (scores as logits) or "mlp_sigmoid" (NeRD Sec. 2.2's MLP + sigmoid, probabilities).
        output_hidden: widths of the output MLP's hidden layers (ours; the paper gives none).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 3,
        hidden: Sequence[int] = DEFAULT_HIDDEN,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        output: str = "linear",
        output_hidden: Sequence[int] = DEFAULT_OUTPUT_HIDDEN,
    ) -> None:
        super().__init__(in_channels, num_classes, spatial_dims, hidden, chunk_bytes, output, output_hidden)
        if not self.hidden:
            raise ValueError("NeRDcHead needs at least one hidden layer, got hidden=()")
        self.mlp = _mlp(2 * spatial_dims, self.hidden, num_classes * in_channels)
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        plain = conv_nd(spatial_dims)(
            in_channels, num_classes, kernel_size=1, bias=False
        ).weight  # (K, C, 1..)
        with torch.no_grad():
            last.bias.copy_(plain.reshape(-1))  # (K, C, 1, ...) -> (K*C,), row-major like the MLP output

    def values_per_position(self) -> int:
        # MLP activations, the (K, J) projections, the features' (C, P) copy, the scores
        return sum(self.hidden) + self.num_classes * (self.hidden[-1] + 2) + self.in_channels

    def slab_scores(self, features: Tensor, positions: Tensor) -> Tensor:
        b, c, *spatial = features.shape
        k, j = self.num_classes, self.hidden[-1]
        hidden = self.mlp[:-1](positions)  # (P, J)
        last = self.mlp[-1]
        a = last.weight.reshape(k, c, j)  # (K*C, J) -> (K, C, J)
        w0 = last.bias.reshape(k, c)  # (K*C,) -> (K, C)
        x = features.reshape(b, c, -1)  # (B, C, *spatial) -> (B, C, P)
        projected = torch.einsum("kcj,bcp->bkjp", a, x)  # (B, K, J, P)
        scores = torch.einsum("bkjp,pj->bkp", projected, hidden) + torch.einsum(
            "kc,bcp->bkp", w0, x
        )  # (B, K, P)
        return scores.reshape(b, k, *spatial)  # (B, K, P) -> (B, K, *spatial)
