"""Evaluation metrics per case and label (MONAI's metrics where MONAI has them).

`case_metrics` is the one entry point the runner uses: one batch of cases' prediction and truth in, a table
of {metric: per-label values} out. Labels are foreground classes 1..K-1; background is excluded from every
reported mean (as the paper's Table 1 average), see `foreground_mean`.

Overlap (Wong & Moradi eq. 5 with binary scores; NeRD): dice, jaccard (MONAI compute_dice / compute_iou).
Boundary (NeRD): hd, hd95, asd in mm (MONAI's surface distances, reduced as compute_hausdorff_distance,
its percentile=95 form and compute_average_surface_distance(symmetric=True) do). Lesion-wise (NeRD):
ldice, ltpr, lfpr, lppv. Counting (Nair et al.): count_error. The last two live in medexp.lesions.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.metrics.utils import get_edge_surface_distance
from torch import Tensor

from medexp.lesions import LESION_METRICS, count_error, lesion_metrics

OVERLAP = ("dice", "jaccard")
DISTANCES = ("hd", "hd95", "asd")
SUPPORTED = OVERLAP + DISTANCES + LESION_METRICS + ("count_error",)


@contextmanager
def one_thread():
    """Run torch on one thread inside the block (restored after): the metrics make many small reductions
    (MONAI's surface extraction) that are several times slower with intra-op threads on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """(B, 1, *spatial) integer labels -> (B, K, *spatial) float one-hot."""
    one_hot = torch.nn.functional.one_hot(labels[:, 0].long(), num_classes)  # (B, *spatial, K)
    return one_hot.movedim(-1, 1).float()  # (B, K, *spatial)


def foreground_mean(values: np.ndarray) -> float:
    """Mean over cases and foreground labels of a (B, K-1) or (K-1,) table from `case_metrics`.

    Every value there is defined (no NaN), so this is a plain mean; NaN only for an empty table.
    """
    values = np.asarray(values, dtype=float)
    return float(values.mean()) if values.size else float("nan")


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of an image of `shape` voxels: the largest distance inside it."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def surface_distances(pred: Tensor, true: Tensor, spacing: Sequence[float], names: Sequence[str]):
    """Boundary metrics of one-hot (B, K, *spatial) prediction and truth, in mm, background excluded.

    The surfaces and the distances between them come from MONAI (get_edge_surface_distance, the routine
    behind compute_hausdorff_distance and compute_average_surface_distance), computed once per case and
    label and reduced the way those functions do:
        hd: symmetric Hausdorff distance, the larger of the two directed maxima;
        hd95: the larger of the two directed 95th percentiles (compute_hausdorff_distance(percentile=95));
        asd: average symmetric surface distance, the mean over the surface voxels of both masks of the
            distance to the other surface (compute_average_surface_distance(symmetric=True)).
    A label absent from both masks gives 0; absent from exactly one, the image diagonal in mm (the largest
    distance in the image), where MONAI would give inf or NaN.

    Returns:
        {name: (B, K-1) float array} for the requested names among DISTANCES.
    """
    batch, num_classes = pred.shape[:2]
    out = {name: np.zeros((batch, num_classes - 1)) for name in names}
    diagonal = image_diagonal(pred.shape[2:], spacing)
    for b, k in np.ndindex(batch, num_classes - 1):
        p, t = pred[b, k + 1].bool(), true[b, k + 1].bool()  # (*spatial)
        if not (p.any() and t.any()):
            for name in names:
                out[name][b, k] = diagonal if p.any() or t.any() else 0.0
            continue
        _, (to_true, to_pred), _ = get_edge_surface_distance(p, t, spacing=spacing, symmetric=True)
        for name in names:
            if name == "asd":
                value = torch.cat([to_true, to_pred]).mean()
            elif name == "hd":
                value = torch.maximum(to_true.max(), to_pred.max())
            else:
                value = torch.maximum(torch.quantile(to_true, 0.95), torch.quantile(to_pred, 0.95))
            out[name][b, k] = float(value)
    return out


def object_metrics(prediction: np.ndarray, truth: np.ndarray, num_classes: int, names: Sequence[str]):
    """Lesion-wise metrics and count_error per case and foreground label of (B, *spatial) label maps.

    Returns:
        {name: (B, K-1) float array} for the requested names among LESION_METRICS and "count_error".
    """
    shape = (prediction.shape[0], num_classes - 1)
    out = {name: np.zeros(shape) for name in names}
    for b in range(shape[0]):
        for k in range(1, num_classes):
            pred, true = prediction[b] == k, truth[b] == k
            if any(name in LESION_METRICS for name in names):
                row = lesion_metrics(pred, true)
                for name in LESION_METRICS:
                    if name in out:
                        out[name][b, k - 1] = row[name]
            if "count_error" in out:
                out["count_error"][b, k - 1] = count_error(pred, true)
    return out


def case_metrics(
    prediction: Tensor,
    truth: Tensor,
    num_classes: int,
    metrics: Sequence[str] = ("dice",),
    spacing: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Per-label metrics of one batch of cases.

    Args:
        prediction: (B, 1, *spatial) predicted label map (2D or 3D).
        truth: (B, 1, *spatial) true label map.
        num_classes: K, background included.
        metrics: names from SUPPORTED.
        spacing: voxel spacing in mm per spatial axis (distance metrics); None means 1 mm.

    Returns:
        {metric: array (B, K-1)} for the foreground labels; every value is defined (never NaN):
        - dice, jaccard: 1 when the label is absent from both prediction and truth (nothing to find, nothing
          found), 0 when absent from one only.
        - hd, hd95, asd (mm): 0 when absent from both, the image diagonal in mm when absent from one only.
        - ldice, ltpr, lfpr, lppv: see medexp.lesions.lesion_metrics (both empty: 1, 1, 0, 1).
        - count_error: |objects counted in the prediction - connected components of the truth|, 0 when
          both are empty (medexp.lesions.count_error).
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != truth shape {tuple(truth.shape)}")
    if prediction.ndim < 3 or prediction.shape[1] != 1:
        raise ValueError(f"expected (B, 1, *spatial) label maps, got shape {tuple(prediction.shape)}")
    unknown = [m for m in metrics if m not in SUPPORTED]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; supported: {', '.join(SUPPORTED)}")
    spatial_dims = prediction.ndim - 2
    spacing = [1.0] * spatial_dims if spacing is None else [float(s) for s in spacing]
    if len(spacing) != spatial_dims:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for {spatial_dims} spatial dims")
    with one_thread():
        out = _metric_table(prediction.detach().cpu(), truth.detach().cpu(), num_classes, metrics, spacing)
    return {name: out[name].astype(float) for name in metrics}


def _metric_table(prediction: Tensor, truth: Tensor, num_classes: int, metrics, spacing) -> dict:
    pred, true = one_hot_labels(prediction, num_classes), one_hot_labels(truth, num_classes)
    out = {}
    if "dice" in metrics:
        out["dice"] = compute_dice(pred, true, include_background=False, ignore_empty=False).numpy()
    if "jaccard" in metrics:
        out["jaccard"] = compute_iou(pred, true, include_background=False, ignore_empty=False).numpy()
    distance_names = [m for m in DISTANCES if m in metrics]
    if distance_names:
        out.update(surface_distances(pred, true, spacing, distance_names))
    object_names = [m for m in metrics if m in LESION_METRICS or m == "count_error"]
    if object_names:
        labels_pred, labels_true = prediction[:, 0].numpy(), truth[:, 0].numpy()  # (B, *spatial)
        out.update(object_metrics(labels_pred, labels_true, num_classes, object_names))
    return out
