"""Shared fixtures: run the real `medexp` CLI in a scratch folder with its own MLflow store."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# As the medexp CLI does (medexp/run/runtime.py), before torch loads: OpenMP threads that spin while waiting
# lose their time slice to each other when other processes share the cores, which made in-process training
# steps several times slower on a loaded 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY = [
    "dataset.shape=[16,16,16]",
    "dataset.num_cases=8",
    "trainer.max_epochs=2",
    "trainer.progress=false",
    "tracking.log_plots=false",  # the plots cost seconds per run; test_train_e2e checks them once
    "tracking.log_model=false",  # the MLflow model costs a second per run; test_predict/test_nnunet check it
]


def run_medexp(args: list[str], cwd: Path, timeout: int = 1500, env: dict | None = None):
    """`medexp ARGS` in a subprocess (the installed entry point's module), capturing output."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "medexp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def store_uri(cwd: Path) -> str:
    return f"sqlite:///{(cwd / 'outputs' / 'mlflow.db').resolve()}"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """One scratch folder (and MLflow store) shared by the end-to-end tests of a session."""
    return tmp_path_factory.mktemp("medexp-e2e")


@contextlib.contextmanager
def tracking(uri: str):
    """mlflow's fluent API on `uri` inside the block (the default store of this process afterwards)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


class Payload:
    """Unpickling this calls os.system(command): what a crafted checkpoint or model file would do on load."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))
