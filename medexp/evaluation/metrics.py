"""Evaluation metrics per case and label (MONAI's metrics where MONAI has them).

`case_metrics` is the one entry point the runner uses: one batch of cases' prediction and truth in, a table
of {metric: per-label values} out. Labels are foreground classes 1..K-1; background is excluded from every
reported mean (as the paper's Table 1 average).

Overlap (Wong & Moradi eq. 5 with binary scores; NeRD): dice, jaccard (MONAI compute_dice / compute_iou).
Boundary (NeRD): hd, hd95, asd in mm from MONAI's surface distances, reduced by one of two definitions
(`eval.distance`, DISTANCE_DEFINITIONS; docs/design.md §9 Evaluation): "medexp" (default) as MONAI's
compute_hausdorff_distance, its percentile=95 form and compute_average_surface_distance(symmetric=True) do;
"medpy" as medpy.metric.binary hd95 / asd do (the LA literature's). Neither paper defines them.
Lesion-wise (NeRD): ldice, ltpr, lfpr, lppv. Counting (Nair et al.): count_error. The last two live in
medexp.evaluation.lesions.

Empty labels (the convention of MONAI's ignore_empty and of nnU-Net, docs/design.md §9):
- a label absent from both truth and prediction is undefined for that case: NaN in every metric, left out
  of every mean (the case says nothing about how well the label is segmented);
- absent from the truth only: Dice = Jaccard = 0 (every predicted voxel is a false positive);
- absent from exactly one side: hd, hd95, asd are the image diagonal in mm (the largest distance inside
  the image; BraTS scores a missed or invented region the same way), where MONAI would give inf or NaN;
- lesion-wise ratios and count_error: their formulas, NaN where a denominator is 0
  (medexp.evaluation.lesions).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.metrics.utils import get_edge_surface_distance
from torch import Tensor

from medexp.evaluation.lesions import LESION_METRICS, count_error, lesion_metrics
from medexp.evaluation.names import DISTANCE_DEFINITIONS, DISTANCES, OVERLAP, SUPPORTED  # noqa: F401 - light


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
    """Mean over labels of the per-label case means of a (B, K-1) table from `case_metrics`.

    NaN entries (labels absent from a case) are left out; a label with no defined case is left out of the
    mean over labels; NaN when nothing is defined.
    """
    values = np.atleast_2d(np.asarray(values, dtype=float))  # (B, K-1)
    counts = np.isfinite(values).sum(axis=0)
    if not counts.any():
        return float("nan")
    per_label = np.nansum(values, axis=0)[counts > 0] / counts[counts > 0]
    return float(per_label.mean())


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of an image of `shape` voxels: the largest distance inside it."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def surface_distances(
    pred: Tensor,
    true: Tensor,
    spacings: Sequence[Sequence[float]],
    names: Sequence[str],
    distance: str = "medexp",
) -> dict[str, np.ndarray]:
    """Boundary metrics of one-hot (B, K, *spatial) prediction and truth, in mm, background excluded.

    The surfaces (mask voxels with a face neighbour outside the mask or the image) and the distances from
    each surface voxel to the nearest voxel of the other surface come from MONAI (get_edge_surface_distance,
    the routine behind compute_hausdorff_distance and compute_average_surface_distance), once per case and
    label. With d_p (prediction -> truth) and d_t (truth -> prediction) they are reduced per `distance`:
        hd (both): max(max d_p, max d_t), the symmetric Hausdorff distance;
        hd95, "medexp": max(P95(d_p), P95(d_t)), the larger directed 95th percentile (MONAI's percentile=95);
        hd95, "medpy": P95(d_p and d_t pooled), medpy.metric.binary.hd95;
        asd, "medexp": mean of d_p and d_t pooled, i.e. over the surface voxels of both masks (MONAI's
            symmetric=True; equal-weighted per voxel, not medpy's assd, the mean of the two means);
        asd, "medpy": mean of d_p, prediction -> truth only, medpy.metric.binary.asd(result, reference).
    P95 interpolates linearly (numpy.percentile's default, as medpy). A label absent from both masks gives
    NaN; absent from exactly one, the image diagonal in mm (medpy raises there), in both definitions.

    Args:
        spacings: one voxel spacing (mm per spatial axis) per case b.
        distance: one of DISTANCE_DEFINITIONS.

    Returns:
        {name: (B, K-1) float array} for the requested names among DISTANCES.
    """
    if distance not in DISTANCE_DEFINITIONS:
        raise ValueError(f"distance={distance!r}: expected one of {', '.join(DISTANCE_DEFINITIONS)}")
    batch, num_classes = pred.shape[:2]
    out = {name: np.full((batch, num_classes - 1), np.nan) for name in names}
    for b, k in np.ndindex(batch, num_classes - 1):
        p, t = pred[b, k + 1].bool(), true[b, k + 1].bool()  # (*spatial)
        if not (p.any() and t.any()):
            if p.any() or t.any():
                diagonal = image_diagonal(pred.shape[2:], spacings[b])
                for name in names:
                    out[name][b, k] = diagonal
            continue
        with warnings.catch_warnings():  # MONAI >= 1.5 passes its own deprecated argument to get_mask_edges
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            _, (to_true, to_pred), _ = get_edge_surface_distance(
                p, t, spacing=list(spacings[b]), symmetric=True
            )
        for name in names:
            out[name][b, k] = _reduce(name, distance, to_true.double(), to_pred.double())
    return out


def _reduce(name: str, distance: str, to_true: Tensor, to_pred: Tensor) -> float:
    """One boundary metric from the directed distances (surface_distances gives the definitions)."""
    pooled = torch.cat([to_true, to_pred])
    if name == "hd":
        return float(pooled.max())
    if name == "hd95" and distance == "medpy":
        return float(torch.quantile(pooled, 0.95))
    if name == "hd95":
        return float(torch.maximum(torch.quantile(to_true, 0.95), torch.quantile(to_pred, 0.95)))
    return float(to_true.mean() if distance == "medpy" else pooled.mean())  # asd


def object_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    num_classes: int,
    names: Sequence[str],
    scores: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Lesion-wise metrics and count_error per case and foreground label of (B, *spatial) label maps.

    Args:
        scores: (B, K, *spatial) soft predictions for counting (Nair et al. count on the soft mask); None
            counts on the binary masks of `prediction`.

    Returns:
        {name: (B, K-1) float array} for the requested names among LESION_METRICS and "count_error".
    """
    shape = (prediction.shape[0], num_classes - 1)
    out = {name: np.full(shape, np.nan) for name in names}
    for b in range(shape[0]):
        for k in range(1, num_classes):
            pred, true = prediction[b] == k, truth[b] == k
            if any(name in LESION_METRICS for name in names):
                row = lesion_metrics(pred, true)
                for name in LESION_METRICS:
                    if name in out:
                        out[name][b, k - 1] = row[name]
            if "count_error" in out:
                soft = pred.astype(np.float32) if scores is None else scores[b, k]
                out["count_error"][b, k - 1] = count_error(soft, true)
    return out


def _spacings(spacing, batch: int, spatial_dims: int) -> list[list[float]]:
    """One spacing per case from None (1 mm), one sequence for all cases, or one sequence per case."""
    if spacing is None:
        return [[1.0] * spatial_dims] * batch
    spacing = [np.asarray(s, dtype=float).ravel().tolist() for s in np.atleast_2d(np.asarray(spacing, float))]
    if len(spacing) == 1:
        spacing = spacing * batch
    for s in spacing:
        if len(s) != spatial_dims:
            raise ValueError(f"spacing {s} has {len(s)} values for {spatial_dims} spatial dims")
    if len(spacing) != batch:
        raise ValueError(f"{len(spacing)} spacings for a batch of {batch} cases")
    return spacing


def case_metrics(
    prediction: Tensor,
    truth: Tensor,
    num_classes: int,
    metrics: Sequence[str] = ("dice",),
    spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
    *,
    scores: Tensor | None = None,
    valid: Tensor | None = None,
    distance: str = "medexp",
) -> dict[str, np.ndarray]:
    """Per-label metrics of one batch of cases.

    Args:
        prediction: (B, 1, *spatial) predicted label map (2D or 3D).
        truth: (B, 1, *spatial) true label map.
        num_classes: K, background included.
        metrics: names from SUPPORTED.
        spacing: voxel spacing in mm per spatial axis, one for the batch or one per case (each case's own
            spacing after preprocessing); None means 1 mm.
        scores: (B, K, *spatial) class probabilities; only count_error uses them (Nair et al. count the
            local maxima of the soft prediction); None counts on the binary prediction.
        valid: (B, 1, *spatial) boolean mask of the voxels to score (e.g. not an `ignore` label); voxels
            outside it count as background in both maps, so they add no true or false positive.
        distance: definition of hd95 and asd, one of DISTANCE_DEFINITIONS (`eval.distance`; see
            surface_distances).

    Returns:
        {metric: array (B, K-1)} for the foreground labels, NaN where undefined (see the module docstring:
        a label absent from both maps is NaN in every metric).
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != truth shape {tuple(truth.shape)}")
    if prediction.ndim < 3 or prediction.shape[1] != 1:
        raise ValueError(f"expected (B, 1, *spatial) label maps, got shape {tuple(prediction.shape)}")
    if valid is not None and tuple(valid.shape) != tuple(prediction.shape):
        raise ValueError(
            f"valid mask shape {tuple(valid.shape)} != prediction shape {tuple(prediction.shape)}"
        )
    if distance not in DISTANCE_DEFINITIONS:
        raise ValueError(f"distance={distance!r}: expected one of {', '.join(DISTANCE_DEFINITIONS)}")
    unknown = [m for m in metrics if m not in SUPPORTED]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; supported: {', '.join(SUPPORTED)}")
    spacings = _spacings(spacing, prediction.shape[0], prediction.ndim - 2)
    prediction, truth = prediction.detach().cpu(), truth.detach().cpu()
    if valid is not None:
        valid = valid.detach().cpu().bool()
        prediction, truth = prediction.masked_fill(~valid, 0), truth.masked_fill(~valid, 0)
    soft = None if scores is None else scores.detach().cpu().float().numpy()
    with one_thread():
        out = _metric_table(prediction, truth, num_classes, metrics, spacings, soft, distance)
    absent = label_voxels(prediction, num_classes) + label_voxels(truth, num_classes) == 0  # (B, K-1)
    return {name: np.where(absent, np.nan, out[name].astype(float)) for name in metrics}


def label_voxels(labels: Tensor, num_classes: int) -> np.ndarray:
    """Voxels of each foreground label per case of a (B, 1, *spatial) label map -> (B, K-1) integers."""
    flat = labels.reshape(labels.shape[0], -1).long()  # (B, N)
    counts = torch.stack([torch.bincount(row, minlength=num_classes)[:num_classes] for row in flat])
    return counts[:, 1:].numpy()


def _metric_table(
    prediction: Tensor, truth: Tensor, num_classes: int, metrics, spacings, scores, distance: str
) -> dict:
    pred, true = one_hot_labels(prediction, num_classes), one_hot_labels(truth, num_classes)
    out = {}
    if "dice" in metrics:  # ignore_empty=False: an empty truth gives 0 (or 1, made NaN by the caller)
        out["dice"] = compute_dice(pred, true, include_background=False, ignore_empty=False).numpy()
    if "jaccard" in metrics:
        out["jaccard"] = compute_iou(pred, true, include_background=False, ignore_empty=False).numpy()
    distance_names = [m for m in DISTANCES if m in metrics]
    if distance_names:
        out.update(surface_distances(pred, true, spacings, distance_names, distance))
    object_names = [m for m in metrics if m in LESION_METRICS or m == "count_error"]
    if object_names:
        labels_pred, labels_true = prediction[:, 0].numpy(), truth[:, 0].numpy()  # (B, *spatial)
        out.update(object_metrics(labels_pred, labels_true, num_classes, object_names, scores))
    return out
