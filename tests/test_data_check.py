"""`medexp data check`: a table of every case, all problems of a folder at once, exit 0 only if all usable."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_nifti import AFFINE, _truncate, make_folder, save

from medexp.commands.data_check import run_check
from medexp.errors import ConfigError, DataError


def spoil_everything(data: Path) -> list[str]:
    """Five different problems in five cases of one folder; returns what the report must name."""
    (data / "labels" / "case1.nii").unlink()
    save(data / "labels" / "case3.nii", np.zeros((22, 17, 8)), np.uint8)
    save(data / "labels" / "case2.nii.gz", np.full((21, 17, 8), 7), np.uint8)
    _truncate(data / "images" / "case0_t1.nii.gz")
    save(data / "images" / "case4_flair.nii.gz", np.full((23, 17, 8), np.nan), np.float32)
    return [
        "images/case1_flair.nii: image without a label",
        "labels/case3.nii: shape 22x17x8 differs",
        "labels/case2.nii.gz: label values 7 not in dataset.labels",
        "images/case0_t1.nii.gz: cannot read (truncated",
        "images/case4_flair.nii.gz: 3128 NaN voxel(s)",
    ]


def _overrides(data: Path, tmp_path: Path) -> list[str]:
    labels = "dataset.labels={0:background,1:blob,2:corner}"
    return [
        "dataset=nifti",
        f"dataset.root={data}",
        "dataset.shape=[16,16,16]",
        labels,
        f"dataset.cache_dir={tmp_path}/c",
    ]


def test_good_folder_exits_0_with_one_row_per_case(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 5)
    assert run_check(_overrides(data, tmp_path)) == 0
    out = capsys.readouterr().out
    assert all(f"case{i}" in out for i in range(5)) and "all 5 case(s) usable" in out
    assert "0, 1, 2" in out, "label values found"


def test_all_problems_of_a_folder_are_reported_at_once(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 6)
    expected = spoil_everything(data)
    assert run_check(_overrides(data, tmp_path)) == 1
    out = " ".join(capsys.readouterr().out.split())  # the table wraps long lines
    for text in expected:
        assert " ".join(text.split()) in out, text
    assert "7 problem(s) in 7 of 8 row(s)" in out, "5 + the other channel of case1 + too few usable cases"


def test_user_errors_raise_one_line(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        run_check(["dataset=nifti", f"dataset.root={tmp_path}/nope"])
    with pytest.raises(ConfigError, match="dataset.normalize=foo"):
        run_check(["dataset=nifti", f"dataset.root={tmp_path}", "dataset.normalize=foo"])


def test_cli_exit_codes(tmp_path, monkeypatch):
    """`medexp data check` of the real typer app: 1 with problems, 2 with a one-line user error."""
    from typer.testing import CliRunner

    from medexp.cli import app

    data = make_folder(tmp_path / "data", 6)
    spoil_everything(data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["data", "check", *_overrides(data, tmp_path)])
    assert result.exit_code == 1, result.output
    assert "case3" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["data", "check", "dataset=nifti", "dataset.root=/no/such/folder"])
    assert result.exit_code == 2
    expected = "medexp data check: error: dataset.root=/no/such/folder: folder not found"
    assert result.output.strip().splitlines()[-1] == expected


def _respace(affine: np.ndarray, factors) -> np.ndarray:
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * np.asarray(factors)  # column k scaled: voxel size along axis k
    return out


SHIFTED = AFFINE.copy()
SHIFTED[:3, 3] += [30.0, 0.0, 0.0]  # 30 mm along x
FLIPPED = AFFINE.copy()
FLIPPED[:3, 0] *= -1  # first voxel axis reversed
GEOMETRY = {
    "shifted 30 mm": (
        SHIFTED,
        None,
        "labels/case2.nii.gz: origin (60, -20, 5) mm is 30 mm from image images/case2_flair.nii.gz's "
        "(30, -20, 5) mm",
    ),
    "flipped": (
        FLIPPED,
        None,
        "labels/case2.nii.gz: orientation PLS differs from image images/case2_flair.nii.gz ALS",
    ),
    "other spacing": (
        _respace(AFFINE, [1, 1, 2]),
        None,
        "labels/case2.nii.gz: spacing 0.9x1.1x6 mm differs from image",
    ),
    "resampled": (
        _respace(AFFINE, [2, 2, 2]),
        (11, 9, 4),
        "labels/case2.nii.gz: shape 11x9x4 differs from image",
    ),
}


@pytest.mark.parametrize("spoil", list(GEOMETRY))
def test_label_off_its_image_grid_fails_naming_the_file(tmp_path, capsys, monkeypatch, spoil):
    """A label map shifted, flipped or resampled against its image: the label file is named."""
    monkeypatch.setenv("COLUMNS", "400")  # one table line per problem
    data = make_folder(tmp_path / "data", 5)
    affine, shape, expected = GEOMETRY[spoil]
    label = nib.load(data / "labels" / "case2.nii.gz")
    array = np.asarray(label.dataobj)
    if shape is not None:
        array = array[::2, ::2, ::2][: shape[0], : shape[1], : shape[2]]
    save(data / "labels" / "case2.nii.gz", array, np.uint8, affine)
    assert run_check(_overrides(data, tmp_path)) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(expected.split()) in out, out
    assert "1 problem(s) in 1 of 5 row(s)" in out


def test_channel_files_of_a_case_must_share_the_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    data = make_folder(tmp_path / "data", 5)
    flair = nib.load(data / "images" / "case4_flair.nii.gz")
    save(data / "images" / "case4_flair.nii.gz", np.asarray(flair.dataobj), np.float32, SHIFTED)
    assert run_check(_overrides(data, tmp_path)) == 1
    out = " ".join(capsys.readouterr().out.split())
    # every file of a case is compared with its first image (FLAIR before T1: sorted suffixes)
    expected = (
        "images/case4_t1.nii.gz: origin (30, -20, 5) mm is 30 mm from "
        "images/case4_flair.nii.gz's (60, -20, 5) mm"
    )
    assert expected in out and "2 problem(s) in 1 of 5 row(s)" in out, out
