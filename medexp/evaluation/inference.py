"""Inference and per-case evaluation of a model over a loader (sliding-window inference from MONAI).

Every metric is computed per case, i.e. per volume: a model trained on 2D slices of volumes
(`dataset.spatial_dims=2`) predicts the slices of a case one by one, and the predictions are stacked back
into the case's volume before any metric is computed, as nnU-Net's 2d configuration scores whole volumes
(NeRD does not say whether its tables score volumes or slices: not stated; medexp's choice). Slice items
say which volume they belong to with the keys "volume" (case id), "slice" (index), "slice_axis" (the
spatial axis they were cut across) and "volume_spacing" (the volume's own spacing in mm);
medexp.data.nifti writes them. Items may carry "spacing", their own spacing after preprocessing; surface
distances use it (else the `spacing` argument).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medexp.evaluation.metrics import case_metrics, label_voxels
from medexp.nn.heads import outputs_probabilities


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


@dataclass
class Case:
    """One evaluated case: the predicted and true label maps (1, 1, *spatial) of a whole volume (or 2D
    image), its class probabilities (1, K, *spatial) when asked for, and its spacing (None: unknown)."""

    id: str
    prediction: torch.Tensor
    truth: torch.Tensor
    scores: torch.Tensor | None = None
    spacing: list[float] | None = None


@dataclass
class CaseTable:
    """Per-case results: ids, {metric: (cases, K-1)} (NaN where undefined) and the voxel counts of every
    foreground label in truth and prediction ({"true_voxels", "pred_voxels"}: (cases, K-1))."""

    ids: list[str] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    voxels: dict[str, np.ndarray] = field(default_factory=dict)


def _item_spacing(batch: dict, key: str) -> list[float] | None:
    """The spacing stored under `key` of a batch of one item (collated as a list of (1,) tensors or a
    (1, dims) tensor), or None."""
    value = batch.get(key)
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.reshape(-1)]
    return [float(torch.as_tensor(v).reshape(-1)[0]) for v in value]


def _first(value) -> object:
    """The single element of a collated batch-of-one field (a list or a tensor)."""
    return value[0].item() if isinstance(value, torch.Tensor) else value[0]


def _stack(parts: list[tuple[int, Case]], axis: int) -> Case:
    """The slices of one volume (index, 2D Case) stacked along spatial `axis` -> a 3D Case."""
    parts = sorted(parts, key=lambda p: p[0])
    cases = [p[1] for p in parts]

    def stack(tensors):  # each (1, C, a, b) -> (1, C, *volume) with the slice index at spatial `axis`
        return torch.stack(tensors, dim=axis + 2)

    scores = stack([c.scores for c in cases]) if cases[0].scores is not None else None
    return Case(
        cases[0].id, stack([c.prediction for c in cases]), stack([c.truth for c in cases]), scores,
        cases[0].spacing,
    )  # fmt: skip


@torch.no_grad()
def predicted_cases(
    model: nn.Module, loader, roi_size: Sequence[int], device: torch.device, with_scores: bool = False
) -> Iterator[Case]:
    """The cases of `loader` (batch 1, in order) with the model's prediction, one whole case at a time.

    Slices of one volume (items with a "volume" key, consecutive in the loader) are predicted one by one and
    yielded once, stacked back into their volume.
    """
    pending: list[tuple[int, Case]] = []
    volume, axis = None, 2
    sigmoid = outputs_probabilities(model)  # head.output=mlp_sigmoid: the outputs are probabilities already
    for batch in loader:
        if batch["image"].shape[0] != 1:
            raise ValueError(f"evaluation loaders have batch 1, got {batch['image'].shape[0]}")
        image = batch["image"].as_subclass(torch.Tensor).to(device)  # plain tensor: no MetaTensor overhead
        logits = predict_logits(model, image, roi_size)  # (1, K, *spatial)
        prediction = logits.argmax(dim=1, keepdim=True).cpu()  # (1, 1, *spatial); argmax of either kind
        scores = None
        if with_scores:  # class probabilities: softmax of logits, or the head's sigmoids as they are
            scores = (logits.float() if sigmoid else torch.softmax(logits.float(), dim=1)).cpu()
        truth = batch["label"].as_subclass(torch.Tensor).cpu()
        if "volume" not in batch:
            yield Case(str(batch["id"][0]), prediction, truth, scores, _item_spacing(batch, "spacing"))
            continue
        this = str(batch["volume"][0])
        if pending and this != volume:
            yield _stack(pending, axis)
            pending = []
        volume, axis = this, int(_first(batch["slice_axis"]))
        spacing = _item_spacing(batch, "volume_spacing")
        pending.append((int(_first(batch["slice"])), Case(this, prediction, truth, scores, spacing)))
    if pending:
        yield _stack(pending, axis)


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
    ignore_label: int | None = None,
    distance: str = "medexp",
) -> CaseTable:
    """Per-case, per-label metrics of `model` over `loader` (batch 1), one row per volume.

    Args:
        spacing: voxel spacing in mm for items that carry none of their own (e.g. the dataset's).
        ignore_label: truth value of voxels that are not scored (counted as background in both maps).
        distance: definition of hd95 and asd (`eval.distance`, medexp.evaluation.metrics.surface_distances).

    Returns:
        CaseTable of the foreground labels.
    """
    was_training = model.training
    model.eval()
    table = CaseTable(values={m: [] for m in metrics}, voxels={"true_voxels": [], "pred_voxels": []})
    for case in predicted_cases(model, loader, roi_size, device, with_scores="count_error" in metrics):
        valid = None if ignore_label is None else case.truth != ignore_label
        result = case_metrics(
            case.prediction, case.truth, num_classes, metrics, case.spacing or spacing,
            scores=case.scores, valid=valid, distance=distance,
        )  # fmt: skip
        truth, prediction = case.truth, case.prediction
        if valid is not None:
            truth, prediction = truth.masked_fill(~valid, 0), prediction.masked_fill(~valid, 0)
        table.voxels["true_voxels"].append(label_voxels(truth, num_classes))
        table.voxels["pred_voxels"].append(label_voxels(prediction, num_classes))
        for m in metrics:
            table.values[m].append(result[m])
        table.ids.append(case.id)
    model.train(was_training)
    width = num_classes - 1
    table.values = {m: np.concatenate(v) if v else np.zeros((0, width)) for m, v in table.values.items()}
    table.voxels = {k: np.concatenate(v) if v else np.zeros((0, width)) for k, v in table.voxels.items()}
    return table
