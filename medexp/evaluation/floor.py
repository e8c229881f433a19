"""The no-learning floor: what a model scores without learning anything from the images.

The floor predicts, for every case, the per-voxel majority label of the training cases (after
preprocessing, without augmentation): the best fixed answer that the training labels alone give. On data
where every case sits on one grid (Wong & Moradi's pad + resize protocol, the brain-like generator), this
template already overlaps the large structures, so a trained model's Dice means something only above it.
It is scored per volume with the same metrics and conventions as the model (medexp.evaluation.inference).

The floor needs one grid for all cases; a dataset whose items differ in shape has none, and
`majority_template` refuses it with a ValueError that says so.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def majority_template(labels: Iterable[torch.Tensor], num_classes: int) -> torch.Tensor:
    """The per-voxel majority class (*spatial) int64 of label maps (B, 1, *spatial) of one shape.

    Values outside 0..num_classes-1 (the ignore label) are not counted. Ties go to the lowest class
    (torch.argmax returns the first maximum), so an all-ignored voxel is background.
    """
    counts = None
    for batch in labels:  # (B, 1, *spatial)
        batch = torch.as_tensor(batch).as_subclass(torch.Tensor).long()
        spatial = tuple(batch.shape[2:])
        if counts is None:
            counts = torch.zeros(num_classes, *spatial, dtype=torch.int32)  # (K, *spatial)
        elif tuple(counts.shape[1:]) != spatial:
            raise ValueError(
                f"the no-learning floor needs cases of one shape; got {list(counts.shape[1:])} and "
                f"{list(spatial)}"
            )
        for k in range(num_classes):
            counts[k] += (batch == k).sum(dim=(0, 1), dtype=torch.int32)
    if counts is None:
        raise ValueError("the no-learning floor needs at least one training case")
    return counts.argmax(dim=0)  # (*spatial)


class TemplatePredictor(nn.Module):
    """A "model" that answers every input with one fixed label map, as one-hot logits (B, K, *spatial), so
    that the evaluation code scores it exactly as it scores a network."""

    def __init__(self, template: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        one_hot = nn.functional.one_hot(template.long(), num_classes)  # (*spatial, K)
        self.register_buffer("logits", one_hot.movedim(-1, 0).float()[None])  # (1, K, *spatial)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[2:]) != tuple(self.logits.shape[2:]):
            raise ValueError(
                f"the floor's template has shape {list(self.logits.shape[2:])}, the input "
                f"{list(image.shape[2:])}"
            )
        return self.logits.expand(image.shape[0], -1, *self.logits.shape[2:]).to(image.device)
