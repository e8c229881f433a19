"""Evaluation of a 2D (slice) model on volumes, through the real `medexp train` and `medexp evaluate`:
one row per test volume, metrics of the stacked 3D prediction with each volume's own spacing, the
empty-label rule (NaN, left out of the means, counted in `_n`), and per-volume validation.

One run serves every test: a U-Net trained on the axial slices of 10 small NIfTI volumes with three labels.
Label 3 occurs in one test volume only (and in no training volume), so the model never predicts it: in
the other test volumes it is absent from truth and prediction (NaN), in that one it is missed (Dice 0).
Every expected value is computed here from the volumes and the checkpoint's own predictions.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_medexp, store_uri
from mlflow.tracking import MlflowClient
from scipy import ndimage

from medexp.data.splits import make_splits
from medexp.run import checkpoint
from medexp.run.restore import restore

pytestmark = pytest.mark.e2e

IDS = [f"v{i}" for i in range(10)]
SHAPE = (16, 16, 5)  # 5 axial slices of 16 x 16
SPACINGS = [(1.0, 1.0, 2.0), (0.8, 0.9, 3.0)]  # alternating per volume: distances must use each one's own
LABELS = ["large", "small", "rare"]


def make_volumes(root: Path) -> dict[str, str]:
    """10 volumes with labels 1 (box), 2 (small box) and 3 (only in the first test volume of split 0)."""
    test = make_splits(IDS, n_splits=5)[0]["test"]
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, case in enumerate(IDS):
        label = np.zeros(SHAPE, np.uint8)
        label[3 + i % 3 : 12, 2:11, 1:4] = 1
        label[12:15, 11 + i % 2 : 15, 2:5] = 2
        if case == test[0]:
            label[1:4, 12:15, 0:2] = 3
        image = label.astype(np.float32) + rng.normal(0, 0.1, SHAPE).astype(np.float32)
        affine = np.diag([*SPACINGS[i % 2], 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"{case}.nii.gz")
    return {"rare": test[0], "others": ",".join(test[1:])}


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("volume-eval")
    found = make_volumes(cwd / "vols")
    args = [
        "train", "dataset=nifti", f"dataset.root={cwd / 'vols'}", "dataset.spatial_dims=2",
        "dataset.shape=[16,16]", "dataset.spacing=null", "dataset.normalize=none", "dataset.fit=crop",
        "dataset.labels={0:background,1:large,2:small,3:rare}", "model=unet", "model.channels=[4,8]",
        "kernel=conventional", "loss=ce", "lr=1e-2", "augment=none", "trainer.max_epochs=8",
        "trainer.batch_size=4", "trainer.progress=false", "tracking.log_plots=false",
        "eval.metrics=[dice,hd]", "experiment_name=vol",
    ]  # fmt: skip
    result = run_medexp(args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store_uri(cwd))
    (run,) = client.search_runs([client.get_experiment_by_name("vol").experiment_id])
    return cwd, run, found


def predict_volume(model, path: Path) -> np.ndarray:
    """The model's label map of a volume, predicted slice by slice along axis 2 and stacked here."""
    image = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    with torch.no_grad():
        slices = [
            model(torch.from_numpy(image[None, None, :, :, k])).argmax(1)[0] for k in range(image.shape[2])
        ]
    return torch.stack(slices, dim=-1).numpy()  # (16, 16, 5)


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    total = pred.sum() + true.sum()
    return math.nan if total == 0 else 2.0 * (pred & true).sum() / total


def hausdorff(pred: np.ndarray, true: np.ndarray, spacing) -> float:
    """Symmetric Hausdorff distance in mm between the surface voxels (mask minus its erosion); the image
    diagonal when one mask is empty, NaN when both are."""
    if not pred.any() and not true.any():
        return math.nan
    if not (pred.any() and true.any()):
        return float(np.linalg.norm(np.array(SHAPE) * np.array(spacing)))

    def surface(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * np.asarray(spacing)

    d = np.linalg.norm(surface(pred)[:, None] - surface(true)[None], axis=-1)
    return float(max(d.min(0).max(), d.min(1).max()))


def expected_table(cwd: Path, run, which: str, cases: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    output_dir = Path(run.data.tags["medexp.output_dir"])
    model = restore(str(output_dir), which).model()
    out = {}
    for case in cases:
        pred = predict_volume(model, cwd / "vols" / "images" / f"{case}.nii.gz")
        truth_img = nib.load(cwd / "vols" / "labels" / f"{case}.nii.gz")
        truth, spacing = np.asarray(truth_img.dataobj), truth_img.header.get_zooms()[:3]
        for k, name in enumerate(LABELS, start=1):
            out[case, name] = {
                "dice": dice(pred == k, truth == k),
                "hd": hausdorff(pred == k, truth == k, spacing),
            }
    return out


def read_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["case"], r["label"]): r for r in csv.DictReader(path.open())}


def close(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5)


def test_test_csv_has_one_row_per_volume_with_the_stacked_3d_metrics(slice_run):
    cwd, run, found = slice_run
    test_cases = [found["rare"], *found["others"].split(",")]
    rows = read_rows(Path(run.data.tags["medexp.output_dir"]) / "test_metrics.csv")
    assert len(rows) == len(test_cases) * len(LABELS), "one row per test volume and label, not per slice"
    assert {case for case, _ in rows} == set(test_cases)
    expected = expected_table(cwd, run, "best", test_cases)
    for key, want in expected.items():
        for metric in ("dice", "hd"):
            assert close(float(rows[key][metric]), want[metric]), (
                key,
                metric,
                rows[key][metric],
                want[metric],
            )
    # the distances follow each volume's own spacing: with the other volumes' spacing they would differ
    swapped = SPACINGS[::-1]
    differs = 0
    model = restore(str(Path(run.data.tags["medexp.output_dir"])), "best").model()
    for case in test_cases:
        pred = predict_volume(model, cwd / "vols" / "images" / f"{case}.nii.gz")
        truth = np.asarray(nib.load(cwd / "vols" / "labels" / f"{case}.nii.gz").dataobj)
        other = swapped[IDS.index(case) % 2]
        differs += sum(
            not close(float(rows[case, name]["hd"]), hausdorff(pred == k, truth == k, other))
            for k, name in enumerate(LABELS, start=1)
        )
    assert differs > 0


def test_label_missing_from_some_test_volumes_is_nan_and_left_out_of_its_mean(slice_run):
    cwd, run, found = slice_run
    rows = read_rows(Path(run.data.tags["medexp.output_dir"]) / "test_metrics.csv")
    others = found["others"].split(",")
    expected = expected_table(cwd, run, "best", [found["rare"], *others])
    absent = [c for c in others if math.isnan(expected[c, "rare"]["dice"])]
    assert absent, "label 3 should be absent from truth and prediction of some test volumes"
    for case in absent:
        assert rows[case, "rare"]["dice"] == "nan" and rows[case, "rare"]["hd"] == "nan"
        assert int(rows[case, "rare"]["true_voxels"]) == 0 and int(rows[case, "rare"]["pred_voxels"]) == 0
    metrics = run.data.metrics
    for metric in ("dice", "hd"):
        for name in LABELS:
            values = [v[metric] for (c, n), v in expected.items() if n == name and not math.isnan(v[metric])]
            assert metrics[f"test/{metric}/{name}"] == pytest.approx(np.mean(values), abs=1e-5), (
                metric,
                name,
            )
            assert metrics[f"test/{metric}/{name}_n"] == len(values)
        label_means = [
            np.nanmean([v[metric] for (c, n), v in expected.items() if n == name]) for name in LABELS
        ]
        assert metrics[f"test/{metric}_mean"] == pytest.approx(np.mean(label_means), abs=1e-5)
    assert metrics["test/dice/rare_n"] == len(others) + 1 - len(absent)


def test_validation_scores_volumes(slice_run):
    # val/dice_mean of the last epoch = the per-volume Dice of the last checkpoint on the validation volume.
    cwd, run, _ = slice_run
    output_dir = Path(run.data.tags["medexp.output_dir"])
    val = make_splits(IDS, n_splits=5)[0]["val"]
    expected = expected_table(cwd, run, "last", val)
    defined = [
        [expected[c, n]["dice"] for c in val if not math.isnan(expected[c, n]["dice"])] for n in LABELS
    ]
    per_label = [np.mean(values) for values in defined if values]  # a label absent from val is left out
    history = MlflowClient(store_uri(cwd)).get_metric_history(run.info.run_id, "val/dice_mean")
    last = max(history, key=lambda m: m.step)
    assert last.step == checkpoint.load(output_dir / "checkpoints" / "last.pt")["epoch"]
    assert last.value == pytest.approx(np.mean(per_label), abs=1e-5)


def test_medexp_evaluate_applies_the_same_protocol(slice_run):
    cwd, run, _ = slice_run
    output_dir = Path(run.data.tags["medexp.output_dir"])
    before = read_rows(output_dir / "test_metrics.csv")
    result = run_medexp(["evaluate", run.info.run_id], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_rows(output_dir / "test_metrics.csv") == before  # rewritten by evaluate, same rows
    again = MlflowClient(store_uri(cwd)).get_run(run.info.run_id).data.metrics
    for key in ("test/dice_mean", "test/dice/rare", "test/dice/rare_n", "test/hd/large"):
        assert again[key] == pytest.approx(run.data.metrics[key], nan_ok=True), key
