"""`hydra/sweeper=optuna`: a tiny Optuna study whose trials are FINISHED child runs of one MLflow parent,
and whose objective (1 - the best validation Dice, minimised) is what the runs logged."""

import csv
from pathlib import Path

import pytest
import yaml
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.config.compose import check, compose_config


@pytest.mark.e2e
def test_three_trials_are_finished_children_of_one_parent(tmp_path: Path):
    args = [
        "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
        "lr=tag(log, interval(1e-4, 1e-2))", "loss=choice(pcc, dice)", *TINY, "trainer.max_epochs=1",
        "eval.metrics=[dice]", "experiment_name=optuna",
    ]  # fmt: skip
    result = run_medexp(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("optuna").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and len(runs) == 4
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    lrs = [float(r.data.params["lr"]) for r in children]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 3, lrs
    assert {r.data.params["loss._target_"] for r in children} <= {
        "medexp.losses.PCCLoss",
        "medexp.losses.DiceLoss",
    }
    best_dice = [
        max(m.value for m in client.get_metric_history(r.info.run_id, "val/dice_mean")) for r in children
    ]
    sweep_dir = Path(parent.data.tags["medexp.sweep_dir"])
    study = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert study["best_value"] == pytest.approx(1 - max(best_dice), abs=1e-9), "the objective, minimised"
    _the_outcome_is_on_the_parent(client, parent.info.run_id, children, study, tmp_path)
    output = result.stdout + result.stderr
    assert "\x1b[" not in output, "no ANSI colour codes in a log (Optuna's colorlog)"
    job_lines = [x for x in result.stdout.splitlines() if x.startswith("job ") and ": MLflow run " in x]
    assert len(job_lines) == 3 and "medexp train" not in result.stdout, "one line per job, no per-job table"
    assert result.stdout.count(str(sweep_dir)) >= 1, "the sweep folder's path whole"


def _the_outcome_is_on_the_parent(client, parent_id: str, children, study: dict, cwd: Path) -> None:
    """Best parameters and value, trials.csv and the history plot on the parent; `medexp report` on the
    sweep reports its trials, not an empty grid."""
    parent = client.get_run(parent_id)
    assert parent.data.tags["medexp.sweeper"] == "OptunaSweeper"
    assert parent.data.metrics["best_value"] == pytest.approx(study["best_value"], abs=1e-12)
    best = {k[len("best.") :]: v for k, v in parent.data.params.items() if k.startswith("best.")}
    assert best == {k: str(v) for k, v in study["best_params"].items()}
    artifacts = {a.path for a in client.list_artifacts(parent_id, "sweep")}
    assert artifacts == {"sweep/trials.csv", "sweep/optimization_history.png"}
    local = Path(client.download_artifacts(parent_id, "sweep/trials.csv", str(cwd)))
    with open(local) as f:
        rows = list(csv.DictReader(f))
    by_run = {
        r.info.run_id: 1 - max(m.value for m in client.get_metric_history(r.info.run_id, "val/dice_mean"))
        for r in children
    }  # the objective worked out from each trial's own validation history
    assert {r["run_id"]: float(r["objective"]) for r in rows} == pytest.approx(by_run, abs=1e-12)
    assert min(float(r["best_so_far"]) for r in rows) == pytest.approx(study["best_value"], abs=1e-9)
    report = run_medexp(["report", "--sweep", parent_id], cwd=cwd, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"best value {study['best_value']:.4f}" in report.stdout and "3 trial(s)" in report.stdout
    assert "optimization_history.png" in report.stdout and "fig3" not in report.stdout


def test_the_documented_search_space_passes_the_preflight_check():
    """hydra/sweeper=optuna_search: lr (log interval), loss and kernel; every end and choice checked."""
    sweeper = compose_config(["hydra/sweeper=optuna_search"], hydra_cfg=True).hydra.sweeper
    assert (sweeper.direction, sweeper.n_trials) == ("minimize", 20)
    assert dict(sweeper.params) == {
        "lr": "tag(log, interval(1e-4, 1e-2))", "loss": "choice(pcc, dice, ce)",
        "kernel": "choice(conventional, gabor, mixed)",
    }  # fmt: skip
    assert check(["-m", "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=3"]) == 3, "n_trials jobs"
