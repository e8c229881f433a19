"""`hydra/sweeper=optuna`: a tiny Optuna study whose trials are FINISHED child runs of one MLflow parent,
and whose objective (1 - the best validation Dice, minimised) is what the runs logged."""

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


def test_the_documented_search_space_passes_the_preflight_check():
    """hydra/sweeper=optuna_search: lr (log interval), loss and kernel; every end and choice checked."""
    sweeper = compose_config(["hydra/sweeper=optuna_search"], hydra_cfg=True).hydra.sweeper
    assert (sweeper.direction, sweeper.n_trials) == ("minimize", 20)
    assert dict(sweeper.params) == {
        "lr": "tag(log, interval(1e-4, 1e-2))", "loss": "choice(pcc, dice, ce)",
        "kernel": "choice(conventional, gabor, mixed)",
    }  # fmt: skip
    assert check(["-m", "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=3"]) == 3, "n_trials jobs"
