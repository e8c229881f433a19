"""End-to-end CPU runs of the real CLI against a real MLflow sqlite store."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.run import checkpoint

pytestmark = pytest.mark.e2e  # every test here runs the real `medexp` command


def test_single_run_logs_params_metrics_and_artifacts(workdir: Path):
    result = run_medexp(["train", *TINY, "tracking.log_plots=true", "experiment_name=e2e"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store_uri(workdir))
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout, "summary table names the run id"
    # params: the flattened resolved config
    assert run.data.params["trainer.max_epochs"] == "2"
    assert run.data.params["loss._target_"] == "medexp.losses.PCCLoss"
    assert run.data.params["model.num_parameters"] == str(4_989_812 - (180 * 20 + 20) + (180 * 6 + 6)), (
        "the paper's network with a 6-class plain head"
    )
    # tags
    tags = run.data.tags
    assert (tags["kernel"], tags["loss"], tags["head"], tags["model"], tags["split"]) == (
        "conventional",
        "pcc",
        "plain",
        "wong2022",
        "0",
    )
    assert tags["lr"] == "0.001" and tags["diverged"] == "false"
    # metrics: one train/loss and val/dice_mean per epoch, test metrics at the end
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "val/dice_mean")) == 2
    names = ["large1", "large2", "medium3", "small4", "tiny5"]
    per_label = [run.data.metrics[f"test/dice/{n}"] for n in names]
    assert all(0.0 <= v <= 1.0 for v in per_label)
    assert abs(run.data.metrics["test/dice_mean"] - sum(per_label) / 5) < 1e-6, "mean over foreground labels"
    # artifacts: resolved config, per-case CSV, best checkpoint
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "test_metrics.csv", "checkpoints", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert any("curves" in p for p in plots) and any("overlay" in p for p in plots), plots
    local = Path(client.download_artifacts(run.info.run_id, "test_metrics.csv", str(workdir / "dl")))
    rows = list(csv.DictReader(local.open()))
    assert len(rows) == 2 * 5, "2 test cases x 5 foreground labels"
    csv_mean = sum(float(r["dice"]) for r in rows) / len(rows)
    assert abs(csv_mean - run.data.metrics["test/dice_mean"]) < 1e-4
    # checkpoint: loads with weights_only and carries the run id and config
    ckpt = checkpoint.load(Path(tags["medexp.output_dir"]) / "checkpoints" / "best.pt")
    assert ckpt["run_id"] == run.info.run_id and "trainer" in ckpt["config"]
    assert isinstance(ckpt["model"]["head.conv.weight"], torch.Tensor)


def test_multirun_makes_four_child_runs_under_one_parent(workdir: Path):
    args = [
        "train",
        "-m",
        "loss=pcc,dice",
        "lr=1e-3,1e-2",
        *TINY,
        "trainer.max_epochs=1",
        "experiment_name=sweep",
    ]
    result = run_medexp(args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store_uri(workdir))
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    assert {r.data.tags["sweep_id"] for r in children} == {parent_id}
    assert all(r.info.status == "FINISHED" for r in children)
    combos = {(r.data.tags["loss"], r.data.params["lr"]) for r in children}
    assert combos == {("pcc", "0.001"), ("pcc", "0.01"), ("dice", "0.001"), ("dice", "0.01")}
    targets = {r.data.tags["loss"]: r.data.params["loss._target_"] for r in children}
    assert targets == {"pcc": "medexp.losses.PCCLoss", "dice": "medexp.losses.DiceLoss"}


def test_evaluate_reproduces_test_metrics_and_best_validation(workdir: Path):
    client = MlflowClient(store_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    before = run.data.metrics
    for split in ("test", "val"):
        result = run_medexp(["evaluate", run.info.run_id, "--split", split], cwd=workdir)
        assert result.returncode == 0, result.stderr[-2000:]
    after = client.get_run(run.info.run_id).data.metrics
    for key in ("test/dice_mean", "test/hd95_mean", "test/dice/large1"):
        assert after[key] == pytest.approx(before[key], abs=1e-6), "same checkpoint, same cases, same numbers"
    best_val = max(m.value for m in client.get_metric_history(run.info.run_id, "val/dice_mean"))
    assert after["val_best/dice_mean"] == pytest.approx(best_val, abs=1e-6), (
        "best.pt is the best validation epoch"
    )
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_evaluate_unknown_run_is_one_line(workdir: Path):
    result = run_medexp(["evaluate", "0123456789abcdef"], cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("medexp evaluate: error: run 0123456789abcdef: not found")
    assert len(result.stderr.strip().splitlines()) == 1


def _compilations(trace_dir: Path) -> list[dict]:
    """Dynamo's compilation_metrics records from a TORCH_TRACE directory (one JSON object per line)."""
    records = []
    for path in trace_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            if '{"compilation_metrics"' in line:
                records.append(json.loads(line[line.index("{") :])["compilation_metrics"])
    return records


def test_compiled_training_traces_the_whole_network_and_keeps_plain_checkpoints(workdir: Path):
    # trainer.compile=true wraps the training step in torch.compile. The "eager" backend keeps this test
    # fast (inductor's C++ build of this network takes ~1 min here) while Dynamo still traces the network;
    # TORCH_TRACE records every compiled frame. A graph break (e.g. MONAI's MetaTensor reaching the model,
    # which made Dynamo give up on the whole forward) shows as a failure or as extra resume frames.
    trace = workdir / "torch-trace"
    env = {"MEDEXP_COMPILE_BACKEND": "eager", "TORCH_TRACE": str(trace)}
    args = ["train", *TINY, "trainer.max_epochs=1", "trainer.compile=true", "experiment_name=compiled"]
    result = run_medexp(args, cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    frames = _compilations(trace)
    assert frames, "torch.compile traced nothing"
    for frame in frames:
        assert frame["fail_type"] is None, frame["fail_reason"]
        assert (frame["co_name"], Path(frame["co_filename"]).name) == ("forward", "wong.py")
        assert frame["graph_op_count"] > 100, "the whole WongNet forward is one graph"
    client = MlflowClient(store_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("compiled").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.compile"] == "True"
    ckpt = checkpoint.load(Path(run.data.tags["medexp.output_dir"]) / "checkpoints" / "last.pt")
    assert not any(key.startswith("_orig_mod") for key in ckpt["model"]), "state dict of the plain model"
