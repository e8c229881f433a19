"""Per-case metric tables reduced for MLflow (means over cases and foreground labels) and written as CSV.

The empty-label rule of medexp.evaluation.metrics holds here: NaN values (a label absent from both the
truth and the prediction of a case) are left out of every mean, and every mean is logged together with
the number of cases it covers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

COUNT_SUFFIX = "_n"


def foreground_means(
    values: dict[str, np.ndarray], label_names: Sequence[str], prefix: str
) -> dict[str, float]:
    """MLflow metrics of a per-case table, for every metric m and foreground label l:

    - `<prefix>/<m>/<l>`: mean over the cases where l is defined (NaN if none);
    - `<prefix>/<m>/<l>_n`: the number of those cases;
    - `<prefix>/<m>_mean`: mean over the labels with a defined mean of their case means (the average of
      Wong & Moradi Table 1);
    - `<prefix>/<m>_mean_n`: the number of cases with at least one defined label.

    Args:
        values: {metric: (cases, K-1) array}, NaN where undefined.
        label_names: K names, background first.
    """
    out = {}
    for metric, table in values.items():
        table = np.atleast_2d(np.asarray(table, dtype=float))  # (cases, K-1)
        defined = np.isfinite(table)
        counts = defined.sum(axis=0)
        sums = np.where(defined, table, 0.0).sum(axis=0)
        per_label = [s / n if n else math.nan for s, n in zip(sums, counts, strict=True)]
        present = [v for v in per_label if math.isfinite(v)]
        out[f"{prefix}/{metric}_mean"] = float(np.mean(present)) if present else math.nan
        out[f"{prefix}/{metric}_mean{COUNT_SUFFIX}"] = int(defined.any(axis=1).sum())
        for name, value, n in zip(label_names[1:], per_label, counts, strict=True):
            out[f"{prefix}/{metric}/{name}"] = float(value)
            out[f"{prefix}/{metric}/{name}{COUNT_SUFFIX}"] = int(n)
    return out


def write_case_csv(
    path: str | Path,
    ids: Sequence[str],
    values: dict[str, np.ndarray],
    label_names: Sequence[str],
    voxels: dict[str, np.ndarray] | None = None,
) -> Path:
    """One row per (case, foreground label): the case id (a volume, also for slice models), the label, the
    voxel counts of that label in truth and prediction (when given) and one column per metric; undefined
    values are written as `nan`."""
    path = Path(path)
    metrics, extra = list(values), list(voxels or {})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label", *extra, *metrics])
        for i, case in enumerate(ids):
            for j, name in enumerate(label_names[1:]):
                counts = [int(voxels[k][i, j]) for k in extra]
                writer.writerow([case, name, *counts, *(f"{values[m][i, j]:.6g}" for m in metrics)])
    return path
