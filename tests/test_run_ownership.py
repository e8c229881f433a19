"""One owner per run, and how a job ends when told to stop (docs/design.md §9; docs/faults.md "Runs and
processes"): SIGTERM during an epoch ends the run KILLED before the process exits (exit status 143), a
resume refuses overrides it would not apply and a run of another store, a second resume of the same run
is refused while the first lives (even during its data preparation) and works once it is dead, and a
FINISHED run is never reopened. Real `medexp` processes and a real sqlite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.run import checkpoint
from medexp.tracking import liveness

pytestmark = pytest.mark.e2e

EPOCHS = 6
RUN = [*TINY, f"trainer.max_epochs={EPOCHS}", "eval.metrics=[dice]", "tracking.log_checkpoint=false"]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def medexp(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medexp", "train", *args], cwd=cwd, env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{what} never came"
        time.sleep(0.003)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def the_run(cwd: Path):
    client = MlflowClient(store_uri(cwd))
    (run,) = client.search_runs([client.get_experiment_by_name("own").experiment_id])
    return client, run


@pytest.fixture(scope="module")
def terminated(tmp_path_factory) -> tuple[Path, Path, subprocess.Popen]:
    """A run stopped by SIGTERM during an epoch after its first checkpoint."""
    cwd = tmp_path_factory.mktemp("ownership")
    folder = cwd / "outputs" / "own"
    proc = medexp([*RUN, "experiment_name=own", f"hydra.run.dir={folder}"], cwd)
    wait_for(lambda: (folder / "checkpoints" / "last.pt").exists(), proc, "the first checkpoint")
    time.sleep(0.2)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    return cwd, folder, proc


def test_sigterm_ends_the_run_killed_before_the_process_exits(terminated):
    cwd, folder, proc = terminated
    assert proc.returncode == -signal.SIGTERM, "ended by SIGTERM itself: a shell sees 143 = 128 + 15"
    client, run = the_run(cwd)
    assert run.info.status == "KILLED", "no other medexp command ran since: the job marked it itself"
    assert liveness.ENDED_TAG not in run.data.tags, "not found dead later by liveness"
    assert 1 <= checkpoint.load(folder / "checkpoints" / "last.pt", mmap=True)["epoch"] < EPOCHS


def test_control_sigterm_leaves_a_plain_mlflow_run_running(tmp_path: Path):
    """Without a handler (MLflow's own client), SIGTERM ends the process and leaves its run RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys, time; from mlflow.tracking import MlflowClient; c = MlflowClient(sys.argv[1]);"
        "r = c.create_run(c.create_experiment('plain')); print(r.info.run_id, flush=True); time.sleep(120)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True, env=env())
    run_id = child.stdout.readline().strip()
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGTERM
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"


def test_resume_refuses_overrides_it_would_not_apply_and_another_store(terminated):
    cwd, folder, _ = terminated
    for override in ("kernel=gabor", "lr=0.5"):
        line = one_error_line(run_medexp(["train", f"resume={folder}", override], cwd=cwd))
        assert f"override {override} is not applied" in line, line
    other = f"sqlite:///{cwd / 'other.db'}"
    line = one_error_line(run_medexp(["train", f"resume={folder}", f"tracking_uri={other}"], cwd=cwd))
    assert "not found in the MLflow store" in line and "tracking_uri" in line, line
    _, run = the_run(cwd)
    assert run.info.status == "KILLED", "refused before the run was touched"


def test_a_second_resume_is_refused_while_the_first_lives_and_works_once_it_died(terminated):
    cwd, folder, _ = terminated
    first = medexp([f"resume={folder}"], cwd)
    lock = folder / liveness.LOCK_FILE
    wait_for(lambda: lock.read_text().startswith(f"pid {first.pid} "), first, "the first resume's lock")
    first.send_signal(signal.SIGSTOP)  # still in its data preparation or early training, and alive
    try:
        line = one_error_line(run_medexp(["train", f"resume={folder}"], cwd=cwd))
        assert f"being trained by pid {first.pid}" in line, line
    finally:
        first.kill()
        first.wait()
    third = run_medexp(["train", f"resume={folder}", "trainer.progress=false"], cwd=cwd)
    assert third.returncode == 0, third.stderr[-3000:]
    client, run = the_run(cwd)
    assert run.info.status == "FINISHED"
    for key in ("val/dice_mean", "train/loss"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), f"{key}: every epoch logged exactly once"
    assert len(client.get_metric_history(run.info.run_id, "test/dice_mean")) == 1


def test_a_finished_run_is_not_reopened(terminated):
    cwd, folder, _ = terminated
    _, before = the_run(cwd)
    assert before.info.status == "FINISHED", "the previous test finished it"
    line = one_error_line(run_medexp(["train", f"resume={folder}", "trainer.max_epochs=8"], cwd=cwd))
    assert f"run {before.info.run_id}: already FINISHED" in line, line
    client, after = the_run(cwd)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert len(client.get_metric_history(after.info.run_id, "train/loss")) == EPOCHS


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path):
    (tmp_path / "afile").write_text("")
    folder = tmp_path / "afile" / "run"
    with pytest.raises(NotADirectoryError):  # control: what Hydra meets when it makes the folder
        folder.mkdir(parents=True)
    for args in ([f"hydra.run.dir={folder}"], ["-m", f"hydra.sweep.dir={folder}", "seed=1,2"]):
        line = one_error_line(run_medexp(["train", *args, *TINY], cwd=tmp_path))
        assert f"={folder}: cannot be created: {tmp_path / 'afile'} is a file" in line, line
    assert not (tmp_path / "outputs").exists(), "nothing was created"


def test_an_experiment_name_mlflow_refuses_is_one_line(tmp_path: Path):
    name = "e" * 5000
    with pytest.raises(Exception, match="exceeds the maximum length of 500"):  # control: MLflow refuses it
        MlflowClient(f"sqlite:///{tmp_path / 'control.db'}").create_experiment(name)
    for args in ([], ["-m", "seed=1,2"]):
        line = one_error_line(run_medexp(["train", *args, *TINY, f"experiment_name={name}"], cwd=tmp_path))
        assert "experiment_name=eeee" in line and "(5000 characters)" in line and "500" in line, line
