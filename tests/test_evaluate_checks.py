"""`medexp evaluate RUN` trusts nothing it finds (docs/faults.md, "Data"): a checkpoint copied from another
run is refused, the cases scored are those the run recorded for its split when it trained, and the data folder
is the one the run recorded (an nnU-Net id in dataset.root then needs no $nnUNet_raw)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_medexp
from mlflow.tracking import MlflowClient
from test_nnunet import make_nnunet, phantom, save

from medexp.commands.evaluate import evaluate_run
from medexp.config.build import build_dataset
from medexp.data.splits import make_splits
from medexp.errors import DataError
from medexp.run.restore import restore


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 1-epoch runs (seeds 0 and 1) on an 8-case nnU-Net dataset given by its id, in one sweep."""
    base = tmp_path_factory.mktemp("evaluate-checks")
    make_nnunet(base / "raw", n_train=8, n_test=0)
    args = [
        "train", "-m", "dataset=nifti", "dataset.root=42", "dataset.shape=[16,16,16]",
        "trainer.max_epochs=1", "trainer.progress=false", "tracking.log_plots=false",
        "tracking.log_model=false", "eval.metrics=[dice]", "experiment_name=evaluate_checks", "seed=0,1",
    ]  # fmt: skip
    result = run_medexp(args, cwd=base, env={"nnUNet_raw": str(base / "raw")})
    assert result.returncode == 0, result.stderr[-3000:]
    store = f"sqlite:///{base / 'outputs' / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("evaluate_checks").experiment_id
    runs = [r for r in client.search_runs([experiment]) if "medexp.output_dir" in r.data.tags]
    assert len(runs) == 2
    return base, store, sorted(runs, key=lambda r: r.data.tags["seed"])


@pytest.mark.e2e
def test_evaluate_reads_the_recorded_folder_without_nnUNet_raw(two_runs, monkeypatch):
    base, store, (run, _) = two_runs
    folder = base / "raw" / "Dataset042_Phantom"
    assert (
        run.data.tags["dataset.source"] == str(folder.resolve())
        and run.data.tags["dataset.nnunet_id"] == "42"
    )
    monkeypatch.chdir(base)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    cfg = restore(run.info.run_id, "best", store).cfg
    assert cfg.dataset.root == 42 or str(cfg.dataset.root) == "42"
    with pytest.raises(DataError, match=r"dataset.root=42: not a folder; .* nnUNet_raw"):
        build_dataset(cfg).prepare()  # control: the run's config alone cannot find its data here
    metrics = evaluate_run(run.info.run_id, tracking_uri=store)
    assert metrics["test/dice_mean"] == pytest.approx(run.data.metrics["test/dice_mean"], abs=1e-6)


@pytest.mark.e2e
def test_a_checkpoint_of_another_run_is_refused(two_runs, monkeypatch):
    base, store, (run_a, run_b) = two_runs
    monkeypatch.chdir(base)
    own = Path(run_a.data.tags["medexp.output_dir"]) / "checkpoints" / "best.pt"
    other = Path(run_b.data.tags["medexp.output_dir"]) / "checkpoints" / "best.pt"
    shutil.copy(own, base / "own_best.pt")
    client = MlflowClient(store)
    before = len(client.get_metric_history(run_a.info.run_id, "test/dice_mean"))
    try:
        shutil.copy(other, own)
        assert restore(run_a.info.run_id, "best", store).state["run_id"] == run_b.info.run_id, (
            "control: the copied file loads as run A's checkpoint"
        )
        with pytest.raises(DataError) as err:
            evaluate_run(run_a.info.run_id, tracking_uri=store)
        assert str(err.value) == (
            f"{own}: checkpoint of run {run_b.info.run_id}, not of run {run_a.info.run_id}; evaluate run "
            f"{run_b.info.run_id}, or put run {run_a.info.run_id}'s own best.pt back"
        )
        logged = client.get_metric_history(run_a.info.run_id, "test/dice_mean")
        assert len(logged) == before, "nothing was logged into run A"
    finally:
        shutil.copy(base / "own_best.pt", own)


def add_case(folder: Path, i: int) -> list[Path]:
    t1, flair, label = phantom((14 + i % 3, 18, 12), i)
    files = [
        folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz",
        folder / "imagesTr" / f"case_{i:03d}_0001.nii.gz",
    ]
    save(files[0], t1)
    save(files[1], flair)
    files.append(folder / "labelsTr" / f"case_{i:03d}.nii.gz")
    save(files[2], label, np.uint8)
    return files


@pytest.mark.e2e
def test_cases_added_after_training_do_not_change_the_test_set(two_runs, monkeypatch, capsys):
    base, store, (run, _) = two_runs
    monkeypatch.chdir(base)
    folder = base / "raw" / "Dataset042_Phantom"
    recorded = restore(run.info.run_id, "best", store).state["info"]["split_cases"]["test"]
    assert len(recorded) == 2, "8 cases at 60/10/30: round(2.4) = 2 test cases"
    added = [f for i in range(10, 13) for f in add_case(folder, i)]
    moved = []
    try:
        now = make_splits([f"case_{i:03d}" for i in [*range(8), *range(10, 13)]], n_splits=5)[0]["test"]
        assert sorted(now) != sorted(recorded), "control: 3 more cases reshuffle split 0's test set"
        metrics = evaluate_run(run.info.run_id, tracking_uri=store)
        n_added = len(set(now) - set(recorded))
        assert capsys.readouterr().err.strip() == (
            f"medexp evaluate: warning: the test cases of run {run.info.run_id} changed since it trained: "
            f"{n_added} added, 0 of the 2 recorded missing; evaluating the 2 recorded case(s) still in the "
            "data folder"
        )
        output = Path(run.data.tags["medexp.output_dir"])
        with open(output / "test_metrics.csv") as f:
            assert sorted({row["case"] for row in csv.DictReader(f)}) == sorted(recorded)
        assert metrics["test/dice_mean"] == pytest.approx(run.data.metrics["test/dice_mean"], abs=1e-6)
        for path in folder.rglob(f"{recorded[0]}*.nii.gz"):  # one recorded test case leaves the folder
            moved.append(path)
            path.rename(base / path.name)
        evaluate_run(run.info.run_id, tracking_uri=store)
        assert "1 of the 2 recorded missing; evaluating the 1 recorded case(s)" in capsys.readouterr().err
    finally:
        for path in added:
            path.unlink(missing_ok=True)
        for path in moved:
            (base / path.name).rename(path)
