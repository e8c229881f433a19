"""medexp predict: NIfTI in, label maps on the input's grid out, reproducing the run's test Dice."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.data.demo import make_case


def _train(cwd: Path, experiment: str, data: list[str]) -> tuple[str, Path]:
    args = ["train", *data, "trainer.max_epochs=3", "trainer.progress=false", f"experiment_name={experiment}"]
    result = run_medexp(args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(store_uri(cwd))
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.run_id, Path(run.data.tags["medexp.output_dir"])


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice of one label, by its definition; 1 when the label is in neither map."""
    x, y = a == label, b == label
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else 2.0 * (x & y).sum() / total


@pytest.fixture(scope="module")
def demo_run(workdir: Path):
    return _train(workdir, "predict", TINY)


def test_prediction_of_a_test_case_reproduces_its_test_dice(workdir: Path, demo_run):
    run_id, output_dir = demo_run
    rows = list(csv.DictReader((output_dir / "test_metrics.csv").open()))
    case = rows[0]["case"]
    folder = next((workdir / "outputs" / "data").glob("demo3d-*"))
    image = folder / "imagesTr" / f"{case}.nii.gz"
    result = run_medexp(["predict", run_id, "-i", str(image), "-o", str(workdir / "pred")], cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    out = nib.load(workdir / "pred" / image.name)
    truth = nib.load(folder / "labelsTr" / image.name)
    assert out.shape == truth.shape and np.allclose(out.affine, truth.affine)
    pred = np.asarray(out.dataobj)
    assert pred.min() >= 0 and pred.max() <= 5
    names = ["large1", "large2", "medium3", "small4", "tiny5"]
    expected = {r["label"]: float(r["dice"]) for r in rows if r["case"] == case}
    for k, name in enumerate(names, start=1):
        assert dice(pred, np.asarray(truth.dataobj), k) == pytest.approx(expected[name], abs=1e-5), name


def test_larger_volume_with_its_own_affine_uses_sliding_windows(workdir: Path, demo_run, tmp_path: Path):
    run_id, _ = demo_run
    image, _ = make_case(
        np.random.default_rng(7), (24, 40, 20), 6, 0.15
    )  # larger than the 16^3 training shape
    affine = np.array([[0, 0, -1.5, 30], [2.0, 0, 0, -40], [0, 1.0, 0, 12], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "big.nii")
    result = run_medexp(
        ["predict", run_id, "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--probabilities"], cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = nib.load(tmp_path / "out" / "big.nii")
    assert out.shape == (24, 40, 20) and np.allclose(out.affine, affine)
    probs = nib.load(tmp_path / "out" / "big_probabilities.nii.gz").get_fdata()
    assert probs.shape == (24, 40, 20, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.dataobj), probs.argmax(-1))


def test_nifti_run_maps_predictions_back_through_the_preprocessing(workdir: Path, tmp_path: Path):
    # A NIfTI dataset with anisotropic, rotated voxels: training resamples to 1 mm RAS and resizes to 16^3.
    root = tmp_path / "brains"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    affine = np.array([[0, 0, 1.5, -10], [-1.2, 0, 0, 20], [0, 1.0, 0, 5], [0, 0, 0, 1]])
    for i in range(8):
        image, label = make_case(np.random.default_rng([3, i]), (14, 18, 12), 3, 0.15)
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"c{i}.nii.gz")
    run_id, _ = _train(
        workdir, "predict-nifti", ["dataset=nifti", f"dataset.root={root}", "dataset.shape=[16,16,16]"]
    )
    out_dir = tmp_path / "out"
    result = run_medexp(
        ["predict", run_id, "-i", str(root / "images" / "c0.nii.gz"), "-o", str(out_dir)], cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = nib.load(out_dir / "c0.nii.gz")
    assert out.shape == (14, 18, 12) and np.allclose(out.affine, affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}


def test_unreadable_input_is_one_line(workdir: Path, demo_run, tmp_path: Path):
    run_id, _ = demo_run
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    result = run_medexp(["predict", run_id, "-i", str(broken), "-o", str(tmp_path / "o")], cwd=workdir)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"medexp predict: error: {broken}: cannot read as NIfTI")
