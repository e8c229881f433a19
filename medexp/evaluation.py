"""Inference and per-case evaluation of a model over a loader (sliding-window inference from MONAI)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medexp.metrics import case_metrics


@torch.no_grad()
def predict_logits(
    model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.25
) -> torch.Tensor:
    """Logits (B, K, *spatial) for an image (B, C, *spatial); windows of `roi_size` for larger images."""
    if tuple(image.shape[2:]) == tuple(roi_size):
        return model(image)
    return sliding_window_inference(
        image, roi_size=list(roi_size), sw_batch_size=1, predictor=model, overlap=overlap
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    num_classes: int,
    roi_size: Sequence[int],
    device: torch.device,
    metrics: Sequence[str] = ("dice",),
    spacing: Sequence[float] | None = None,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Per-case, per-label metrics of `model` over `loader` (batch 1).

    Returns:
        (case ids, {metric: array (cases, K-1)}) for the foreground labels.
    """
    was_training = model.training
    model.eval()
    ids: list[str] = []
    values: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for batch in loader:
        image = batch["image"].as_subclass(torch.Tensor).to(device)  # plain tensor: no MetaTensor overhead
        logits = predict_logits(model, image, roi_size)
        prediction = logits.argmax(dim=1, keepdim=True).cpu()  # (B, 1, *spatial)
        result = case_metrics(prediction, batch["label"].cpu(), num_classes, metrics, spacing)
        for m in metrics:
            values[m].append(result[m])
        ids.extend(batch["id"])
    model.train(was_training)
    return ids, {m: np.concatenate(v, axis=0) for m, v in values.items()}


def foreground_means(
    values: dict[str, np.ndarray], label_names: Sequence[str], prefix: str
) -> dict[str, float]:
    """{prefix/<metric>_mean, prefix/<metric>/<label>}: case means; `_mean` also over foreground labels."""
    out = {}
    for metric, table in values.items():  # table: (cases, K-1)
        per_label = np.nanmean(table, axis=0)
        out[f"{prefix}/{metric}_mean"] = float(np.nanmean(per_label))
        for name, value in zip(label_names[1:], per_label, strict=True):
            out[f"{prefix}/{metric}/{name}"] = float(value)
    return out


def write_case_csv(
    path: str | Path, ids: Sequence[str], values: dict[str, np.ndarray], label_names: Sequence[str]
):
    """One row per (case, foreground label) with one column per metric."""
    path = Path(path)
    metrics = list(values)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label", *metrics])
        for i, case in enumerate(ids):
            for j, name in enumerate(label_names[1:]):
                writer.writerow([case, name, *(f"{values[m][i, j]:.6g}" for m in metrics)])
    return path
