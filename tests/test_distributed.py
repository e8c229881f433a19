"""The distributed engines users run on, for real (docs/design.md §9): `torchrun` with 2 nodes of 1 process
on 127.0.0.1 (two launches, as on two machines) and Hydra's submitit launcher (`submitit_local`, the same
plugin as `hydra/launcher=slurm`) running a sweep with the parent/child run layout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runs_of(cwd: Path, experiment: str) -> list:
    client = MlflowClient(store_uri(cwd))
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_torchrun_two_nodes_on_localhost_give_one_run_in_sync(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                "--master-addr=127.0.0.1", f"--master-port={port}", "--nproc-per-node=1",
                "-m", "medexp", "train", *TINY, "eval.metrics=[dice]", "experiment_name=torchrun",
            ],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    runs = runs_of(tmp_path, "torchrun")
    assert len(runs) == 1, "only rank 0 logs: one MLflow run for the two nodes"
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["ranks_in_sync"] == "true", "DDP kept the two nodes' weights identical"
    client = MlflowClient(store_uri(tmp_path))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2]


def test_submitit_local_sweep_nests_its_jobs_under_one_parent(tmp_path: Path):
    args = ["train", "-m", "hydra/launcher=submitit_local", "seed=1,2", *TINY, "eval.metrics=[dice]"]
    result = run_medexp([*args, "experiment_name=submitit"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 job(s): 2 finished, 0 diverged, 0 failed" in result.stdout
    runs = runs_of(tmp_path, "submitit")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.data.tags["seed"] for r in children) == ["1", "2"]
    sweep_dir = Path(parent.data.tags["medexp.sweep_dir"])
    for run in children:
        assert Path(run.data.tags["medexp.output_dir"]).parent == sweep_dir
        assert run.data.tags["sweep_id"] == parent.info.run_id
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl")), "the jobs ran through submitit"


NAN_ON_RANK_ONE = '''
import math

import torch.distributed as dist

from medexp.losses import DiceLoss


class NanOnRankOne(DiceLoss):
    """Test-only: medexp's Dice loss, NaN on rank 1 from its second step on; rank 0's stays finite."""

    steps = 0

    def forward(self, logits, label):
        loss = super().forward(logits, label)
        NanOnRankOne.steps += 1
        if dist.is_initialized() and dist.get_rank() == 1 and NanOnRankOne.steps >= 2:
            return loss * math.nan
        return loss
'''


def test_a_non_finite_loss_on_one_rank_only_ends_the_ddp_run_as_diverged(tmp_path: Path):
    """2 gloo ranks; rank 1's loss turns NaN at its second step while rank 0's is finite. The ranks agree
    on "this step is finite" before backward, so neither waits in a gradient all-reduce the other never
    joins: the run ends (well within the timeout) FINISHED, diverged at epoch 1. Before, rank 0 entered
    backward's all-reduce alone and the job hung (tests/test_ddp_agreement.py shows that hang)."""
    (tmp_path / "nan_on_rank_one.py").write_text(NAN_ON_RANK_ONE)
    args = ["train", *TINY, "dataset.num_cases=10", "trainer.devices=2", "trainer.batch_size=1"]
    args += ["loss=dice", "loss._target_=nan_on_rank_one.NanOnRankOne", "eval.metrics=[dice]"]
    args.append("experiment_name=nan1")
    started = time.monotonic()
    result = run_medexp(args, cwd=tmp_path, timeout=600, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(tmp_path, "nan1")
    assert run.info.status == "FINISHED"
    assert run.data.tags["diverged"] == "true" and run.data.tags["diverged_epoch"] == "1"
    assert run.data.tags["world_size"] == "2"
    print(f"diverged 2-rank run ended in {time.monotonic() - started:.0f} s")
