"""scripts/bench_gpu.py runs end to end in its CPU dry run (so it cannot rot before it meets a GPU), and the
counting behind scripts/bench_memory.py (medexp.nn.memory) gives hand-checked numbers."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medexp.data.loaders import auto_num_workers
from medexp.nn.memory import count_step

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    """A module of scripts/ (not a package: they import each other by name, as `python scripts/x.py` lets
    them, since Python puts a script's folder first on sys.path)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_gpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "bench_gpu.json").read_text())
    payload["stdout"] = proc.stdout
    return payload


@pytest.mark.e2e
def test_dry_run_measures_every_step_configuration(dry_run):
    steps = {(r["kernel"], r["head"], r["precision"]): r for r in dry_run["steps"]}
    expected = [(k, "plain", p) for p in ("32", "bf16") for k in ("conventional", "mixed", "gabor")]
    expected += [("conventional", "nerdc", "32"), ("conventional", "nerdm", "32")]
    assert sorted(steps) == sorted(expected)
    for row in steps.values():
        assert row["step_s"] > 0 and row["infer_s"] > 0
    # Gabor layers counted by hand from the network (docs/design.md §4): 1, 2, 3, 3, 3 spatial convs per
    # encoder level and 1, 2, 3, 3 per decoder level = 21; mixed keeps levels 2-4 Gabor: 9 + 6 = 15.
    assert len(steps["gabor", "plain", "32"]["impls"]) == 21
    assert len(steps["mixed", "plain", "bf16"]["impls"]) == 15
    assert steps["conventional", "plain", "32"]["impls"] == {}
    assert set(steps["gabor", "plain", "32"]["impls"].values()) <= {"direct", "direct_contiguous", "fft"}


@pytest.mark.e2e
def test_dry_run_data_run_and_study_estimate(dry_run):
    data = dry_run["data"]
    assert data["auto_workers"] == auto_num_workers(data["cpus"], data["gpus"], "cuda")
    assert data["loader_cases_per_s"] > 0 and data["transform_cases_per_s_per_core"] > 0
    run = dry_run["run"]
    assert run["wall_s"] > 0 and 0.0 <= run["test_dice"] <= 1.0
    # the paper's study: 43 cases -> 26 train (60/10/30), 2 GPUs x batch 1 -> 13 steps per GPU per epoch;
    # 75 models per kernel, 300 epochs, 2 GPUs held, 4 validation cases per epoch
    study = dry_run["study"]
    assert study["steps_per_gpu_per_epoch"] == 13
    rows = {r["kernel"]: r for r in dry_run["steps"] if r["head"] == "plain" and r["precision"] == "32"}
    hours = sum(75 * 2 * 300 * (13 * r["step_s"] + 4 * r["infer_s"]) / 3600 for r in rows.values())
    assert study["study_gpu_hours"] == pytest.approx(hours)
    assert "| model | head | precision | step |" in dry_run["stdout"]
    assert "study_study_gpu_hours=" in dry_run["stdout"]


def test_count_step_by_hand():
    """Linear(4, 16) -> ReLU -> Linear(16, 3) on a batch of 8, SGD: FLOPs and saved bytes by hand."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        x, y = torch.randn(8, 4), torch.randn(8, 3)
    count = count_step(model, x, y, lambda out, t: (out - t).square().mean(), torch.optim.SGD)
    assert count.param_bytes == count.grad_bytes == 4 * (4 * 16 + 16 + 16 * 3 + 3)
    assert count.optimizer_bytes == 0  # plain SGD keeps no state
    # forward 2*8*4*16 + 2*8*16*3; backward: second layer's input and weight gradients 2 * 2*8*16*3,
    # first layer's weight gradient 2*8*4*16 (x needs none)
    assert count.flops == 1024 + 768 + 2 * 768 + 1024
    assert count.saved_bytes == 8 * 16 * 4  # ReLU's output (also the second Linear's input), once
    assert count.peak_bytes >= count.param_bytes + count.grad_bytes + count.saved_bytes


@pytest.mark.slow
def test_bench_memory_counts_the_papers_network():
    bench_memory = _script("bench_memory")
    keys = bench_memory.main(["--size", "16", "--sections", "computed", "--configs", "conventional,nerdc"])
    # docs/design.md §4 and §6: 4,989,812 parameters with the plain head (3,620 of them), NeRDc's head 120,080
    assert keys["computed_conventional_params"] == 4_989_812
    assert keys["computed_nerdc_params"] == 4_989_812 - 3_620 + 120_080
    assert keys["computed_conventional_gflop"] > 0
