"""One tiny default run, started from a folder of its own with its store elsewhere, and everything it must
leave behind: nothing in the working directory, a quiet console and a job.log, MLflow's source/user/commit
tags and dataset inputs, an MLflow model (weights only, with signature and input example) that predicts
from the store alone; and `medexp predict` reproducing the run's test Dice."""

import csv
import getpass
import json
import math
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY, run_medexp, tracking
from mlflow.tracking import MlflowClient

from medexp.data.demo import make_case

pytestmark = pytest.mark.e2e  # every test here runs the real `medexp` command
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`medexp train` with TINY's settings (default metrics; the model logged, as by default), run in an
    empty folder, its store in another."""
    base = tmp_path_factory.mktemp("predict")
    cwd, store = base / "cwd", base / "store"
    cwd.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"  # sqlite:////abs/path/mlflow.db
    args = [*TINY, "tracking.log_model=true", "tracking.register_as=demo", "experiment_name=predict"]
    args = ["train", *args, f"tracking_uri={uri}"]
    result = run_medexp(args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("predict").experiment_id])
    output_dir = Path(run.data.tags["medexp.output_dir"])
    folder = next((store / "data").glob("demo3d-*"))
    return SimpleNamespace(
        base=base, cwd=cwd, store=store, uri=uri, client=client, run=run, result=result,
        run_id=run.info.run_id, output_dir=output_dir, data=folder,
    )  # fmt: skip


def test_a_run_from_another_folder_writes_nothing_there(demo_run):
    """tracking_uri=sqlite:///<dir>/mlflow.db: store, artifacts, run folder and demo data under <dir>."""
    assert list(demo_run.cwd.iterdir()) == [], "nothing at all in the working directory"
    assert {"mlflow.db", "mlartifacts", "runs", "data"} <= {p.name for p in demo_run.store.iterdir()}
    experiment = demo_run.client.get_experiment_by_name("predict")
    assert experiment.artifact_location == (demo_run.store / "mlartifacts").as_uri()
    assert demo_run.run.info.artifact_uri.startswith((demo_run.store / "mlartifacts").as_uri())
    assert demo_run.output_dir.is_relative_to(demo_run.store / "runs")


def test_the_console_is_quiet_and_job_log_holds_the_epochs_and_result(demo_run):
    assert "warning" not in demo_run.result.stderr.lower(), demo_run.result.stderr
    log = (demo_run.output_dir / "job.log").read_text()
    assert "epoch 1/2 train/loss=" in log and "epoch 2/2 train/loss=" in log
    dice = demo_run.run.data.metrics["test/dice_mean"]
    assert f"finished after 2 epoch(s): test/dice_mean={dice:.4f}" in log


def test_run_carries_source_user_commit_and_its_dataset(demo_run):
    tags = demo_run.run.data.tags
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("medexp train", "LOCAL")
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.git.commit"] == head
    inputs = {[t.value for t in d.tags][0]: d.dataset for d in demo_run.run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    sizes = {k: json.loads(d.profile)["num_rows"] for k, d in inputs.items()}
    assert sizes == {"training": 5, "validation": 1, "test": 2}, "8 cases split 60/10/30"
    assert json.loads(inputs["test"].source)["uri"] == str(demo_run.data)


def test_model_is_weights_only_with_signature_and_example(demo_run):
    with tracking(demo_run.uri):
        info = mlflow.models.get_model_info("models:/demo/1")
        folder = Path(
            mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(demo_run.base / "model"))
        )
    assert info.run_id == demo_run.run_id and info.signature is not None
    assert info.signature.inputs.inputs[0].shape == (1, -1, -1, -1)
    assert [p.name for p in info.signature.params.params] == ["affine"]
    assert info.saved_input_example_info is not None
    weights = torch.load(next(folder.rglob("weights.pt")), weights_only=True)
    best = torch.load(demo_run.output_dir / "checkpoints" / "best.pt", weights_only=True)
    assert set(weights) == set(best["model"]), "the network's state dict, nothing else"
    assert all(torch.equal(weights[k], best["model"][k]) for k in weights), "the best checkpoint's weights"


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice of one label, by its definition; NaN when the label is in neither map (left out of means)."""
    x, y = a == label, b == label
    total = x.sum() + y.sum()
    return math.nan if total == 0 else 2.0 * (x & y).sum() / total


@pytest.fixture(scope="module")
def predicted(demo_run):
    """One `medexp predict RUN_ID` (the run's checkpoint) of a test case and of a larger volume with an
    affine of its own, with probabilities."""
    rows = list(csv.DictReader((demo_run.output_dir / "test_metrics.csv").open()))
    case = demo_run.data / "imagesTr" / f"{rows[0]['case']}.nii.gz"
    image, _ = make_case(
        np.random.default_rng(7), (24, 40, 20), 6, 0.15
    )  # larger than the 16^3 training shape
    affine = np.array([[0, 0, -1.5, 30], [2.0, 0, 0, -40], [0, 1.0, 0, 12], [0, 0, 0, 1]])
    (demo_run.base / "big").mkdir()
    nib.save(nib.Nifti1Image(image, affine), demo_run.base / "big" / "big.nii")
    out = demo_run.base / "pred"
    args = ["predict", demo_run.run_id, "-i", str(case), "-i", str(demo_run.base / "big"), "-o", str(out)]
    result = run_medexp([*args, "--probabilities", "--tracking-uri", demo_run.uri], cwd=demo_run.base)
    assert result.returncode == 0, result.stderr[-2000:]
    return SimpleNamespace(rows=rows, case=case, out=out, affine=affine)


def test_prediction_of_a_test_case_reproduces_its_test_dice(demo_run, predicted):
    out = nib.load(predicted.out / predicted.case.name)
    truth = nib.load(demo_run.data / "labelsTr" / predicted.case.name)
    assert out.shape == truth.shape and np.allclose(out.affine, truth.affine)
    pred = np.asarray(out.dataobj)
    assert pred.min() >= 0 and pred.max() <= 5
    names = ["large1", "large2", "medium3", "small4", "tiny5"]
    case = predicted.rows[0]["case"]
    expected = {r["label"]: float(r["dice"]) for r in predicted.rows if r["case"] == case}
    for k, name in enumerate(names, start=1):
        assert dice(pred, np.asarray(truth.dataobj), k) == pytest.approx(
            expected[name], abs=1e-5, nan_ok=True
        )


def test_larger_volume_with_its_own_affine_uses_sliding_windows(predicted):
    out = nib.load(predicted.out / "big.nii")
    assert out.shape == (24, 40, 20) and np.allclose(out.affine, predicted.affine)
    probs = nib.load(predicted.out / "big_probabilities.nii.gz").get_fdata()
    assert probs.shape == (24, 40, 20, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.dataobj), probs.argmax(-1))


def test_the_store_alone_is_enough(demo_run, predicted):
    """With the run's output folder gone, the logged model loads with mlflow.pyfunc and
    `medexp predict runs:/<id>/model` writes the labels the checkpoint gave before."""
    expected = np.asarray(nib.load(predicted.out / predicted.case.name).dataobj)
    moved = demo_run.base / "moved-away"
    shutil.move(demo_run.output_dir, moved)
    try:
        after = demo_run.base / "after"
        args = ["predict", f"runs:/{demo_run.run_id}/model", "-i", str(predicted.case), "-o", str(after)]
        result = run_medexp([*args, "--tracking-uri", demo_run.uri], cwd=demo_run.base)
        assert result.returncode == 0, result.stderr[-2000:]
        np.testing.assert_array_equal(np.asarray(nib.load(after / predicted.case.name).dataobj), expected)
        img = nib.load(predicted.case)
        with tracking(demo_run.uri):
            model = mlflow.pyfunc.load_model("models:/demo/1")  # the registered version of the same model
        image = np.asarray(img.dataobj, np.float32)[None]  # (1, X, Y, Z)
        labels = model.predict(image, params={"affine": img.affine.ravel().tolist()})
        np.testing.assert_array_equal(labels, expected)
    finally:
        shutil.move(moved, demo_run.output_dir)


def test_unreadable_input_is_one_line(demo_run, tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from medexp.cli import app

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setenv("COLUMNS", "300")
    args = [
        "predict",
        demo_run.run_id,
        "-i",
        str(broken),
        "-o",
        str(tmp_path / "o"),
        "--tracking-uri",
        demo_run.uri,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"medexp predict: error: {broken}: cannot read (truncated or corrupt file")
