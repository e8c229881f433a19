"""Object-level metrics on binary masks: lesion-wise metrics (NeRD, Zhang et al.) and object counting
(Nair et al.). numpy/scipy only.

Objects ("lesions") are connected components with full connectivity (8 in 2D, 26 in 3D: voxels touching
at a corner belong to the same object).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

LESION_METRICS = ("ldice", "ltpr", "lfpr", "lppv")


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask (full connectivity) -> (integer map, number of objects)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, count = ndimage.label(mask, structure=structure)
    return labelled, int(count)


def lesion_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Lesion-wise Dice, TPR, FPR and PPV of one binary prediction against one binary truth (NeRD, Sec. 4).

    With GL, PL the numbers of true and predicted lesions, TP_g the true lesions that overlap (share at least
    one voxel with) a predicted lesion, and TP_p the predicted lesions that overlap a true lesion:
        LTPR = TP_g / GL,  LPPV = TP_p / PL,  LFPR = (PL - TP_p) / PL = 1 - LPPV,
        LDice = (TP_g + TP_p) / (GL + PL).
    NeRD writes LDice = TPR / (GL + PL) and LPPV = TPR / PL with TPR the true-lesion count; its LDice lacks
    the factor 2 of a Dice (as written it never exceeds 0.5). Counting each side's matches keeps every
    value in [0, 1] when one predicted lesion covers several true ones, and equals 2 TPR / (GL + PL) and
    TPR / PL when lesions match one to one.

    Empty masks (a ratio with a zero denominator takes the value of "no error of that kind"):
    both empty -> LDice = LTPR = LPPV = 1, LFPR = 0; no true lesion -> LTPR = 1 (none missed), and
    LDice = LPPV = 0, LFPR = 1 from the formulas; no predicted lesion -> LPPV = 1, LFPR = 0 (no false
    positive), and LDice = LTPR = 0.

    Args:
        pred, true: boolean arrays of the same shape (any dimension).

    Returns:
        {"ldice", "ltpr", "lfpr", "lppv"} -> float.
    """
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {true.shape}")
    pred_cc, pl = components(pred)
    true_cc, gl = components(true)
    overlap = pred & true
    tp_true = np.unique(true_cc[overlap]).size  # true lesions hit by the prediction
    tp_pred = np.unique(pred_cc[overlap]).size  # predicted lesions that hit a true lesion
    lppv = tp_pred / pl if pl else 1.0
    return {
        "ldice": (tp_true + tp_pred) / (gl + pl) if gl + pl else 1.0,
        "ltpr": tp_true / gl if gl else 1.0,
        "lfpr": 1.0 - lppv,
        "lppv": lppv,
    }


def dbscan_ball_clusters(points: np.ndarray, radii: np.ndarray, eps: float) -> int:
    """Number of DBSCAN clusters (min_samples = 1) of points with inscribed-ball radii.

    The dissimilarity of two points is the gap between one and the other's ball,
    |x_i - x_j| - max(r_i, r_j), and two points are neighbours when it is at most eps. With min_samples = 1
    every point is a core point, so DBSCAN's clusters are exactly the connected components of this
    neighbourhood graph; that is computed here with scipy (no scikit-learn dependency).

    Args:
        points: (P, ndim) coordinates in voxels.
        radii: (P,) radii in voxels.
        eps: DBSCAN's eps in voxels.
    """
    if len(points) == 0:
        return 0
    neighbours = cKDTree(points).query_ball_point(points, radii + eps)  # |x_i - x_j| <= r_i + eps
    rows = np.repeat(np.arange(len(points)), [len(n) for n in neighbours])
    cols = np.concatenate(neighbours).astype(int)
    graph = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(len(points), len(points)))
    count, _ = connected_components(graph, directed=False)  # undirected: r_i or r_j, i.e. max(r_i, r_j)
    return int(count)


def count_objects(mask: np.ndarray, eps: float = 2.0) -> int:
    """Number of objects in a predicted mask by local maxima + DBSCAN (Nair et al., Sec. IV-C).

    Nair et al. take the local maxima (maximum filter) of the predicted mask and cluster them with DBSCAN;
    one cluster per object. On a binary label map every foreground voxel is a maximum, so the maxima are
    taken of the mask's Euclidean distance transform (the object centres and medial ridges), with a
    3^ndim maximum filter, and clustered by `dbscan_ball_clusters`: maxima merge when one lies within eps
    of the other's inscribed ball, so the ridge of one elongated object is one cluster while two touching
    round objects joined by a neck stay two. A convex object counts as one (checked on random ellipsoids);
    strongly non-convex shapes (shells, rings) may count as several.

    Args:
        mask: boolean array (2D or 3D).
        eps: DBSCAN eps in voxels.

    Returns:
        The number of objects; 0 for an empty mask.
    """
    if not mask.any():
        return 0
    distance = ndimage.distance_transform_edt(mask)
    footprint = np.ones((3,) * mask.ndim, dtype=bool)
    peaks = (distance == ndimage.maximum_filter(distance, footprint=footprint)) & mask
    return dbscan_ball_clusters(np.argwhere(peaks).astype(float), distance[peaks], eps)


def count_error(pred: np.ndarray, true: np.ndarray, eps: float = 2.0) -> float:
    """|count_objects(pred) - number of connected components of true|; 0 when both are empty."""
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {true.shape}")
    return float(abs(count_objects(pred, eps) - components(true)[1]))
