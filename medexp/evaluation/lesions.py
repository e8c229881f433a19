"""Object-level metrics: lesion-wise metrics (NeRD, Zhang et al.) and object counting (Nair et al.).

Objects ("lesions") of a binary mask are its connected components with full connectivity (8 in 2D, 26 in
3D: voxels touching at a corner belong to the same object). Counting clusters the local maxima of a soft
prediction with scikit-learn's DBSCAN, as Nair et al. do.

Undefined values follow the rule of medexp.evaluation.metrics: a ratio whose denominator is 0 is NaN (the
case says nothing about it) and is left out of every mean.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from medexp.evaluation.names import LESION_METRICS  # noqa: F401 - re-exported; defined without numpy

NAN = math.nan


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask (full connectivity) -> (integer map, number of objects)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, count = ndimage.label(mask, structure=structure)
    return labelled, int(count)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else NAN


def lesion_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Lesion-wise Dice, TPR, FPR and PPV of one binary prediction against one binary truth (NeRD, Sec. 3.2).

    With GL, PL the numbers of true and predicted lesions, TP_g the true lesions that overlap (share at least
    one voxel with) a predicted lesion, and TP_p the predicted lesions that overlap a true lesion:
        LTPR = TP_g / GL,  LPPV = TP_p / PL,  LFPR = (PL - TP_p) / PL = 1 - LPPV,
        LDice = (TP_g + TP_p) / (GL + PL).
    NeRD writes LDice = TPR / (GL + PL) and LPPV = TPR / PL with TPR the true-lesion count; its LDice lacks
    the factor 2 of a Dice (as written it never exceeds 0.5). Counting each side's matches keeps every
    value in [0, 1] when one predicted lesion covers several true ones, and equals 2 TPR / (GL + PL) and
    TPR / PL when lesions match one to one.

    Empty masks: a ratio with a zero denominator is NaN. Both empty -> all four NaN; no true lesion ->
    LTPR NaN, LDice = LPPV = 0, LFPR = 1 (every predicted lesion is a false positive); no predicted
    lesion -> LPPV and LFPR NaN, LDice = LTPR = 0.

    Args:
        pred, true: boolean arrays of the same shape (any dimension).

    Returns:
        {"ldice", "ltpr", "lfpr", "lppv"} -> float (NaN where undefined).
    """
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {true.shape}")
    pred_cc, pl = components(pred)
    true_cc, gl = components(true)
    overlap = pred & true
    tp_true = np.unique(true_cc[overlap]).size  # true lesions hit by the prediction
    tp_pred = np.unique(pred_cc[overlap]).size  # predicted lesions that hit a true lesion
    lppv = _ratio(tp_pred, pl)
    return {
        "ldice": _ratio(tp_true + tp_pred, gl + pl),
        "ltpr": _ratio(tp_true, gl),
        "lfpr": 1.0 - lppv,
        "lppv": lppv,
    }


def local_maxima(scores: np.ndarray, threshold: float = 0.5, min_distance: int = 1) -> np.ndarray:
    """Coordinates (P, ndim) of the local maxima of a soft map above `threshold`.

    A voxel is a maximum when it equals the maximum filter of the map over a (2 min_distance + 1)^ndim
    window (Nair et al. Sec. V-C: "applying maximum filter ... the local maxima function", i.e.
    scikit-image's peak_local_max, which is not installed here, so the same test is written with scipy's
    maximum_filter). Every voxel of a plateau is a maximum; DBSCAN then merges them. The threshold keeps
    the background's tiny bumps out; 0.5 (a voxel the model calls foreground) is our choice, the paper
    gives none.
    """
    size = 2 * int(min_distance) + 1
    peaks = (scores == ndimage.maximum_filter(scores, size=size, mode="nearest")) & (scores > threshold)
    return np.argwhere(peaks).astype(float)


def count_objects(scores: np.ndarray, eps: float = 2.0, threshold: float = 0.5, min_distance: int = 1) -> int:
    """Number of objects in a soft prediction by local maxima + DBSCAN (Nair et al., Sec. IV-D and V-C).

    The local maxima of the predicted soft mask (the foreground probability of one label) are clustered
    with DBSCAN (scikit-learn; min_samples = 1, so every maximum belongs to a cluster and there is no
    noise); the number of clusters is the number of objects. Maxima closer than `eps` voxels fall into one
    cluster, and clusters chain through such neighbours: a plateau of equal maxima inside one object is one
    cluster, while two objects whose peaks stand apart stay two even when their masks touch.

    Args:
        scores: soft map (2D or 3D) in [0, 1]; a binary mask works too (every foreground voxel is then a
            maximum, and objects closer than eps merge).
        eps: DBSCAN's eps in voxels (ours; the paper gives none).
        threshold, min_distance: see `local_maxima`.

    Returns:
        The number of objects; 0 when no voxel exceeds the threshold.
    """
    points = local_maxima(np.asarray(scores, dtype=float), threshold, min_distance)
    if len(points) == 0:
        return 0
    from sklearn.cluster import DBSCAN  # heavy import, only needed when counting

    labels = DBSCAN(eps=eps, min_samples=1).fit(points).labels_
    return int(labels.max()) + 1


def count_error(scores: np.ndarray, true: np.ndarray, eps: float = 2.0, threshold: float = 0.5) -> float:
    """|count_objects(scores) - connected components of true|; NaN when both are empty.

    Args:
        scores: soft prediction of one label (or its binary mask).
        true: boolean truth of that label.
    """
    if scores.shape != true.shape:
        raise ValueError(f"prediction shape {scores.shape} != truth shape {true.shape}")
    counted, actual = count_objects(scores, eps, threshold), components(true)[1]
    if counted == 0 and actual == 0:
        return NAN
    return float(abs(counted - actual))
