"""nnU-Net v2's ignore label: voxels whose class is IGNORE_INDEX take no part in any loss or metric.

Written here because neither MONAI's losses nor medexp's take a voxel mask, and a mask multiplied into the
inputs (MONAI's MaskedLoss) still counts the masked voxels in losses that subtract means (PCC, eq. 4) or
normalise per image. The runner applies it in two places, so that no loss or metric needs to know:

- losses: `IgnoreLabelLoss` (wrapped around the configured loss by medexp.config.build.build_loss when the
  dataset has an ignore label) evaluates the loss on the non-ignored voxels of each image only, gathered
  into a (1, C, N, 1[, 1]) "image", and averages over the images of the batch. Every loss that reduces
  over voxels (PCC, Dice, Tversky, CE, focal, weighted CE, exp-log) then sees exactly the annotated voxels;
  a batch without ignored voxels is passed through unchanged. The boundary-weighted CE needs the spatial
  layout of the labels and is refused with an ignore label (build_loss).
- metrics: medexp.evaluation.inference.evaluate(ignore_label=IGNORE_INDEX) sets prediction and truth to
  background at ignored voxels: every foreground metric then counts them as true negatives, which no
  overlap metric uses (Dice, IoU), and the surfaces and lesions are those of the annotated region.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medexp.data.labels import IGNORE_INDEX


class IgnoreLabelLoss(nn.Module):
    """`loss(input, target)` over the voxels whose label is not IGNORE_INDEX.

    Args:
        loss: any medexp loss (input contract: logits (B, C, *spatial), target (B, 1, *spatial)).
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if target.ndim != input.ndim or target.shape[1] != 1:
            return self.loss(input, target)  # one-hot targets carry no ignore label
        ignored = target[:, 0] == IGNORE_INDEX  # (B, *spatial)
        if not bool(ignored.any()):
            return self.loss(input, target)
        tail = (1,) * (input.ndim - 3)  # keep the number of spatial dims: (1, C, N, 1, 1) in 3D
        terms = []
        for b in range(input.shape[0]):
            keep = ~ignored[b]
            n = int(keep.sum())
            if n:
                logits = input[b][:, keep].reshape(1, input.shape[1], n, *tail)  # (1, C, N, 1[, 1])
                labels = target[b][:, keep].reshape(1, 1, n, *tail)  # (1, 1, N, 1[, 1])
                terms.append(self.loss(logits, labels))
        if not terms:  # nothing annotated in the whole batch: no gradient, but a graph for backward()
            return input.sum() * 0.0
        return torch.stack(terms).mean()
