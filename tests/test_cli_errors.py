"""User errors end with one line naming the key and what is allowed, exit code 2, no traceback, no run."""

from pathlib import Path

import pytest
from conftest import TINY, run_medexp


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("kernel=nope", "kernel=nope: unknown choice; allowed: conventional"),
        ("trainer.max_epoch=3", "trainer.max_epoch: unknown key 'max_epoch'; keys of trainer: accelerator"),
        ("lr=-1", "lr=-1.0: expected a positive number"),
        ("split=7", "split=7: expected an integer in 0..4"),
        ("lr=abc", "lr"),
        ("dataset.num_cases=2", "dataset.num_cases=2: expected an integer >= 3"),
        ("kernel.impl=fast", "kernel.impl=fast: expected one of auto, direct, direct_contiguous, fft, gemm"),
    ],
)
def test_bad_override_is_one_line(tmp_path: Path, override: str, expected: str):
    result = run_medexp(["train", *TINY, override], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("medexp train: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs" / "mlflow.db").exists(), "no MLflow run (not even a store) was created"


def test_bad_value_inside_a_sweep_is_caught_before_any_job(tmp_path: Path):
    result = run_medexp(["train", "-m", "lr=1e-3,-1", "loss=pcc,nope", *TINY], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "loss=nope: unknown choice" in result.stderr or "lr=-1" in result.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
