"""Evaluation metrics per case and label (MONAI's metrics where MONAI has them).

`case_metrics` is the one entry point the runner uses: one case's prediction and truth in, a table of
{metric: per-label values} out. Labels are foreground classes 1..K-1; background is excluded from every
reported mean (as the paper's Table 1 average).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from torch import Tensor

SUPPORTED = ("dice",)


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """(B, 1, *spatial) integer labels -> (B, K, *spatial) float one-hot."""
    one_hot = torch.nn.functional.one_hot(labels[:, 0].long(), num_classes)  # (B, *spatial, K)
    return one_hot.movedim(-1, 1).float()  # (B, K, *spatial)


def case_metrics(
    prediction: Tensor,
    truth: Tensor,
    num_classes: int,
    metrics: Sequence[str] = ("dice",),
    spacing: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Per-label metrics of one batch of cases.

    Args:
        prediction: (B, 1, *spatial) predicted label map.
        truth: (B, 1, *spatial) true label map.
        num_classes: K, background included.
        metrics: names from SUPPORTED.
        spacing: voxel spacing in mm (distance metrics).

    Returns:
        {metric: array (B, K-1)} for the foreground labels. Dice of a label absent from both prediction
        and truth is 1 (nothing to find, nothing found); absent from one only, 0.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != truth shape {tuple(truth.shape)}")
    unknown = [m for m in metrics if m not in SUPPORTED]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; supported: {', '.join(SUPPORTED)}")
    pred, true = one_hot_labels(prediction, num_classes), one_hot_labels(truth, num_classes)
    out = {}
    if "dice" in metrics:
        dice = compute_dice(pred, true, include_background=False, ignore_empty=False)  # (B, K-1)
        out["dice"] = dice.cpu().numpy()
    return out
