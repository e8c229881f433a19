"""Scoring a folder of predictions against a folder of labels (medexp.evaluation.folder): Dice worked out by
hand on 4 x 4 x 1 maps, and every mismatch named in one line."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medexp.errors import DataError
from medexp.evaluation.folder import score_folder
from medexp.evaluation.summary import foreground_means

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _save(folder: Path, name: str, grid, affine=AFFINE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(grid, np.uint8)[..., None], affine), folder / f"{name}.nii.gz")


TRUTH = [[0, 0, 2, 2], [0, 1, 1, 2], [0, 1, 1, 0], [0, 0, 0, 0]]  # label 1: 4 voxels, label 2: 3
PRED = [[0, 0, 2, 0], [0, 1, 1, 2], [0, 1, 0, 0], [0, 0, 1, 0]]  # label 1: 4 (3 right), label 2: 2 (2 right)


def test_dice_per_case_and_label_as_worked_out_by_hand(tmp_path):
    _save(tmp_path / "labels", "c0", TRUTH)
    _save(tmp_path / "pred", "c0", PRED)
    _save(tmp_path / "labels", "c1", TRUTH)
    _save(tmp_path / "pred", "c1", TRUTH)  # perfect
    scores = score_folder(tmp_path / "pred", tmp_path / "labels", labels={"background": 0, "a": 1, "b": 2})
    assert scores.ids == ["c0", "c1"] and scores.label_names == ["background", "a", "b"]
    dice = scores.values["dice"]  # (cases, 2)
    assert dice[0].tolist() == pytest.approx([2 * 3 / (4 + 4), 2 * 2 / (3 + 2)], rel=1e-6)
    assert np.allclose(dice[1], [1.0, 1.0])
    assert scores.voxels["true_voxels"][0].tolist() == [4, 3] and scores.voxels["pred_voxels"][
        0
    ].tolist() == [4, 2]
    means = foreground_means(scores.values, scores.label_names, "test")
    expected = [(0.75 + 1) / 2, (0.8 + 1) / 2]
    assert [means["test/dice/a"], means["test/dice/b"]] == pytest.approx(expected, rel=1e-6)


def test_ignore_label_voxels_are_not_scored(tmp_path):
    truth = [row[:] for row in TRUTH]
    truth[3][2] = 9  # the voxel where the prediction says 1 wrongly is "ignore" in the labels
    _save(tmp_path / "labels", "c0", truth)
    _save(tmp_path / "pred", "c0", PRED)
    scores = score_folder(
        tmp_path / "pred", tmp_path / "labels", labels={"0": "background", "1": "a", "2": "b", "9": "ignore"}
    )
    assert scores.values["dice"][0, 0] == pytest.approx(
        2 * 3 / (4 + 3), rel=1e-6
    )  # the false positive left out


def test_labels_from_the_files_when_no_dataset_json(tmp_path):
    _save(tmp_path / "labels", "c0", TRUTH)
    _save(tmp_path / "pred", "c0", PRED)
    scores = score_folder(tmp_path / "pred", tmp_path / "labels")
    assert scores.label_names == ["background", "label1", "label2"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "pred" / "c1.nii.gz").unlink(), r"labels/c1.nii.gz: no prediction c1"),
        (lambda d: _save(d / "pred", "extra", TRUTH), r"pred/extra.nii.gz: no labels for case extra"),
        (
            lambda d: _save(d / "pred", "c1", [[0, 1]]),
            r"pred/c1.nii.gz: shape \(1, 2, 1\) != .*labels/c1.nii.gz",
        ),
        (
            lambda d: _save(d / "pred", "c1", TRUTH, np.diag([1.0, 1.0, 3.0, 1.0])),
            r"pred/c1.nii.gz: voxel-to-world affine",
        ),
        (lambda d: _save(d / "pred", "c1", [[0, 7, 0, 0]] * 4), r"pred/c1.nii.gz: label value\(s\) \[7\]"),
    ],
)
def test_each_mismatch_is_named(tmp_path, change, message):
    for case in ("c0", "c1"):
        _save(tmp_path / "labels", case, TRUTH)
        _save(tmp_path / "pred", case, TRUTH)
    change(tmp_path)
    with pytest.raises(DataError, match=message):
        score_folder(tmp_path / "pred", tmp_path / "labels", labels=["background", "a", "b"])
