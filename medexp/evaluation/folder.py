"""Scoring a folder of predicted label maps against a folder of true ones (nnU-Net's `evaluate_folder`), with
the metrics and conventions of a run's own test evaluation (medexp.evaluation.metrics.case_metrics:
per case, per foreground label, NaN where a label is in neither map, the ignore label left out).

Files are matched by case id (the file name without its image ending, as `medexp predict` names its
outputs). Every mismatch is one line naming the files: a case with no prediction, a prediction with no
labels, another shape or voxel-to-world affine, a value that is no class of the dataset. The folder is
scored only when there is none, so a table never silently covers fewer cases than the folder holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medexp.data.labels import IGNORE_INDEX, class_table, parse_labels
from medexp.data.layout import SUFFIXES_3D, strip_suffix
from medexp.errors import DataError
from medexp.evaluation.metrics import case_metrics, label_voxels

AFFINE_TOLERANCE_MM = 1e-3  # voxel-to-world entries that differ by less are the same grid


@dataclass
class FolderScores:
    """Per-case scores of a folder: ids, {metric: (cases, K-1)}, voxel counts and the class names."""

    ids: list[str] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    voxels: dict[str, np.ndarray] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)


def _cases(folder: Path) -> dict[str, Path]:
    """{case id: file} of the NIfTI files in `folder` (one level, sorted)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found = {}
    for path in sorted(folder.iterdir()):
        stem = strip_suffix(path.name, SUFFIXES_3D)
        if stem is not None and path.is_file():
            found[stem] = path
    if not found:
        raise DataError(f"{folder}: no NIfTI label maps (.nii.gz, .nii) in it")
    return found


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(integer label map, affine (4, 4), spacing in mm) of one file."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if not np.allclose(data, np.round(data)):
        raise DataError(f"{path}: not a label map (non-integer values)")
    return np.round(data).astype(np.int64), image.affine, [float(z) for z in image.header.get_zooms()[:3]]


def _pairs(pred_dir: Path, label_dir: Path) -> list[tuple[str, Path, Path]]:
    predictions, labels = _cases(pred_dir), _cases(label_dir)
    problems = [
        f"{labels[c]}: no prediction {c}<ending> in {pred_dir}" for c in labels if c not in predictions
    ]
    problems += [
        f"{predictions[c]}: no labels for case {c} in {label_dir}" for c in predictions if c not in labels
    ]
    if problems:
        raise DataError("; ".join(problems) if len(problems) == 1 else _several(problems))
    return [(c, predictions[c], labels[c]) for c in labels]


def _several(problems: list[str]) -> str:
    return f"{len(problems)} problems:\n  " + "\n  ".join(problems)


def _to_classes(values: np.ndarray, lut: dict[int, int], path: Path) -> np.ndarray:
    unknown = sorted(set(np.unique(values).tolist()) - set(lut))
    if unknown:
        raise DataError(
            f"{path}: label value(s) {unknown} are no class of the dataset (known: {sorted(lut)})"
        )
    table = np.zeros(max(lut) + 1, np.int64)
    for value, cls in lut.items():
        table[value] = cls
    return table[values]


def label_table(labels: dict | list | None, label_dir: Path) -> tuple[dict[int, int], list[str]]:
    """{value: class} and class names from a dataset's `labels` (dataset.json), or from the values found in
    the label files (0 background, then each value its own class) when none is given."""
    if labels is not None:
        return class_table(parse_labels(labels, "labels"))
    values = sorted({int(v) for path in _cases(label_dir).values() for v in np.unique(_read(path)[0])})
    return class_table({v: f"label{v}" for v in values if v != 0})


def score_folder(
    pred_dir: str | Path,
    label_dir: str | Path,
    labels: dict | list | None = None,
    metrics: Sequence[str] = ("dice",),
    distance: str = "medexp",
) -> FolderScores:
    """Per-case, per-label metrics of the predictions in `pred_dir` against the labels in `label_dir`.

    Raises:
        DataError: every mismatch, one line each (see the module docstring).
    """
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    lut, names = label_table(labels, label_dir)
    num_classes = len(names)
    scores = FolderScores(
        label_names=names, values={m: [] for m in metrics}, voxels={"true_voxels": [], "pred_voxels": []}
    )
    for case, pred_path, label_path in _pairs(pred_dir, label_dir):
        pred, pred_affine, _ = _read(pred_path)
        truth, affine, spacing = _read(label_path)
        if pred.shape != truth.shape:
            raise DataError(f"{pred_path}: shape {pred.shape} != {label_path} shape {truth.shape}")
        if not np.allclose(pred_affine, affine, atol=AFFINE_TOLERANCE_MM):
            raise DataError(f"{pred_path}: voxel-to-world affine differs from {label_path}'s (another grid)")
        truth_cls = torch.as_tensor(_to_classes(truth, lut, label_path))[None, None]  # (1, 1, *spatial)
        pred_cls = torch.as_tensor(_to_classes(pred, lut, pred_path))[None, None]
        valid = truth_cls != IGNORE_INDEX
        result = case_metrics(
            pred_cls, truth_cls, num_classes, metrics, spacing[: truth.ndim], valid=valid, distance=distance
        )
        truth_cls, pred_cls = truth_cls.masked_fill(~valid, 0), pred_cls.masked_fill(~valid, 0)
        scores.voxels["true_voxels"].append(label_voxels(truth_cls, num_classes))
        scores.voxels["pred_voxels"].append(label_voxels(pred_cls, num_classes))
        for m in metrics:
            scores.values[m].append(result[m])
        scores.ids.append(case)
    scores.values = {m: np.concatenate(v) for m, v in scores.values.items()}
    scores.voxels = {k: np.concatenate(v) for k, v in scores.voxels.items()}
    return scores
