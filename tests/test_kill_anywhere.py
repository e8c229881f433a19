"""Nothing lost, whatever happens (docs/design.md §9): a SIGKILL at ten moments of a 4-epoch run, from its
first instant to its last, and a full disk while saving a checkpoint.

After each kill, ONE `medexp train resume=...` (by output folder or by MLflow run id) must give one FINISHED
run with the four epochs logged once each (distinct `val/dice_mean` steps 1..4), test metrics logged once,
best.pt holding the best validation epoch, no temp file left, and no RUNNING run anywhere in the store.

The moments are found by watching the run's files and its store, not by sleeping, and each kill is checked
to have landed where it was meant (e.g. a half-written `.last.pt.*.tmp` is still there). The scenarios share
one workdir (store, demo data) and run two at a time.
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.run import checkpoint
from medexp.tracking.liveness import mark_dead_runs

pytestmark = pytest.mark.e2e

RUN = [*TINY, "trainer.max_epochs=4", "eval.metrics=[dice]", "tracking.log_checkpoint=false"]
FRESH_DATA = "outputs/data-fresh"  # the one scenario that is killed while the demo data is generated


class Watch:
    """What a running job has written so far: its folder, its checkpoints (every new last.pt) and its run."""

    def __init__(self, folder: Path, db: Path, data_root: Path) -> None:
        self.folder, self.db, self.data_root = folder, db, data_root
        self.ckpt = folder / "checkpoints"
        self.last_pts: list[int] = []  # inode of every last.pt seen: one per completed epoch

    def poll(self) -> None:
        try:
            inode = os.stat(self.ckpt / "last.pt").st_ino
        except FileNotFoundError:
            return
        if not self.last_pts or self.last_pts[-1] != inode:
            self.last_pts.append(inode)

    def writing_last(self) -> bool:
        return any(self.ckpt.glob(".last.pt.*.tmp"))

    def generating(self) -> bool:
        return any(self.data_root.glob(".demo3d-*.tmp/imagesTr/*"))

    def run_id(self) -> str | None:
        """The MLflow run tagged with this folder, read straight from the sqlite file."""
        if not self.db.exists():
            return None
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10) as con:
                row = con.execute(
                    "select run_uuid from tags where key = 'medexp.output_dir' and value = ?",
                    (str(self.folder.resolve()),),
                ).fetchone()
        except sqlite3.OperationalError:  # tables not created yet
            return None
        return row[0] if row else None

    def status(self) -> str | None:
        """The MLflow status of this folder's run, read straight from the sqlite file."""
        run_id = self.run_id()
        if run_id is None:
            return None
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10) as con:
            return con.execute("select status from runs where run_uuid = ?", (run_id,)).fetchone()[0]


@dataclass
class Moment:
    name: str
    when: Callable[[Watch], bool]
    delay: float = 0.0  # seconds between noticing and killing
    resume_by: str = "folder"  # or "run id"
    landed: Callable[[Watch], str | None] = lambda w: None  # why the kill missed its moment, or None


def epoch_of(path: Path) -> int | None:
    return checkpoint.load(path, mmap=True)["epoch"] if path.exists() else None


def _missed(condition: bool, why: str) -> str | None:
    return None if condition else why


MOMENTS = [
    Moment("started", lambda w: (w.folder / ".hydra" / "overrides.yaml").exists(),
           landed=lambda w: _missed(w.run_id() is None, "an MLflow run existed already")),
    Moment("generating demo data", lambda w: w.generating(),
           landed=lambda w: _missed(w.generating() and not list(w.data_root.glob("demo3d-*/dataset.json")),
                                    "the demo data was complete")),
    Moment("MLflow run created", lambda w: w.run_id() is not None, resume_by="run id",
           landed=lambda w: _missed(not (w.folder / "config.yaml").exists(), "training had started")),
    Moment("training epoch 1", lambda w: (w.folder / "config.yaml").exists(), delay=0.3,
           landed=lambda w: _missed(not (w.ckpt / "last.pt").exists(), "epoch 1 had ended")),
    Moment("writing the first last.pt", lambda w: w.writing_last() and not w.last_pts, resume_by="run id",
           landed=lambda w: _missed(w.writing_last() and not (w.ckpt / "last.pt").exists(),
                                    "the write had ended")),
    Moment("best.pt appears", lambda w: (w.ckpt / "best.pt").exists(),
           landed=lambda w: _missed(epoch_of(w.ckpt / "last.pt") == 1, "epoch 2 had ended")),
    Moment("writing last.pt of epoch 3", lambda w: len(w.last_pts) == 2 and w.writing_last(),
           landed=lambda w: _missed(w.writing_last() and epoch_of(w.ckpt / "last.pt") == 2,
                                    "the write had ended")),
    Moment("training the last epoch", lambda w: len(w.last_pts) == 3, delay=0.4, resume_by="run id",
           landed=lambda w: _missed(epoch_of(w.ckpt / "last.pt") == 3, "epoch 4 had ended")),
    Moment("last checkpoint landed, before the test", lambda w: len(w.last_pts) == 4, delay=0.1,
           landed=lambda w: _missed(not (w.folder / "test_metrics.csv").exists(), "the test had ended")),
    Moment("test metrics logged, run not closed", lambda w: (w.folder / "test_metrics.csv").exists(),
           resume_by="run id",
           landed=lambda w: _missed(not (w.folder / "result.yaml").exists() and w.status() != "FINISHED",
                                    "the run had ended (a FINISHED run is not resumed)")),
]  # fmt: skip


def kill_at(moment: Moment, index: int, cwd: Path) -> dict:
    """Start the run, SIGKILL its process group at `moment`, check where it landed, resume once."""
    folder = cwd / "outputs" / "kill" / f"m{index}"
    data_root = cwd / (FRESH_DATA if moment.name == "generating demo data" else "outputs/data")
    args = [*RUN, f"experiment_name=kill{index}", f"hydra.run.dir={folder}"]
    if moment.name == "generating demo data":
        args.append(f"dataset.root={data_root}")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medexp", "train", *args], cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    watch = Watch(folder, cwd / "outputs" / "mlflow.db", data_root)
    deadline = time.monotonic() + 400
    while not moment.when(watch):
        assert proc.poll() is None, f"ended before the moment: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the moment never came"
        watch.poll()
        time.sleep(0.003)
    time.sleep(moment.delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    result = {"folder": folder, "missed": moment.landed(watch), "run_id": watch.run_id()}

    uri = store_uri(cwd)
    if result["run_id"]:  # SIGKILL left it RUNNING; liveness sees its process is gone
        client = MlflowClient(uri)
        result["status_after_kill"] = client.get_run(result["run_id"]).info.status
        mark_dead_runs(uri)
        result["status_marked"] = client.get_run(result["run_id"]).info.status
    target = result["run_id"] if moment.resume_by == "run id" else str(folder)
    result["resume"] = run_medexp(["train", f"resume={target}", "trainer.progress=false"], cwd=cwd)
    return result


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    cwd = tmp_path_factory.mktemp("kill-anywhere")
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {m.name: pool.submit(kill_at, m, i, cwd) for i, m in enumerate(MOMENTS)}
        results = {name: future.result() for name, future in futures.items()}
    print(f"kill-anywhere: {len(MOMENTS)} kills + resumes in {time.monotonic() - started:.0f} s")
    return cwd, results


@pytest.mark.parametrize("index", range(len(MOMENTS)), ids=[m.name for m in MOMENTS])
def test_sigkill_then_one_resume_loses_nothing(scenarios, index: int):
    cwd, results = scenarios
    moment = MOMENTS[index]
    result = results[moment.name]
    assert result["missed"] is None, f"the kill missed its moment: {result['missed']}"
    resume = result["resume"]
    assert resume.returncode == 0, resume.stderr[-3000:]
    if result["run_id"]:
        # SIGKILL leaves no chance to close the run; a concurrent scenario's command may already have
        # marked it KILLED (every medexp command that opens the store does), never FINISHED or FAILED
        assert result["status_after_kill"] in ("RUNNING", "KILLED")
        assert result["status_marked"] == "KILLED", "its process is gone: liveness marks it KILLED"

    client = MlflowClient(store_uri(cwd))
    experiment = client.get_experiment_by_name(f"kill{index}")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resume continued the killed run (or started the one it never created)"
    (run,) = runs
    assert run.info.status == "FINISHED"
    if result["run_id"]:
        assert run.info.run_id == result["run_id"]
    val = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/dice_mean"))
    assert [step for step, _ in val] == [1, 2, 3, 4], "every epoch logged exactly once"
    loss_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert loss_steps == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "test/dice_mean")) == 1, "test logged once"

    ckpt = result["folder"] / "checkpoints"
    assert not list(ckpt.glob(".*.tmp")), "stale temp files were removed"
    assert checkpoint.load(ckpt / "last.pt", mmap=True)["epoch"] == 4
    best = checkpoint.load(ckpt / "best.pt", mmap=True)
    assert best["best"] == max(v for _, v in val), "best.pt holds the best validation epoch"
    assert best["metrics"]["val/dice_mean"] == val[best["epoch"] - 1][1]
    assert not list((cwd / "outputs").glob("data*/.demo3d-*.tmp")), "no half-made demo data left"


def test_no_run_left_running(scenarios):
    cwd, _ = scenarios
    client = MlflowClient(store_uri(cwd))
    ids = [e.experiment_id for e in client.search_experiments()]
    running = [r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'")]
    assert running == []


def killed_after_its_first_checkpoint(cwd: Path, name: str) -> Path:
    """A run of `RUN` SIGKILLed as soon as its first last.pt is complete; its folder."""
    folder = cwd / "outputs" / "kill" / name
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medexp", "train", *RUN, f"experiment_name={name}", f"hydra.run.dir={folder}"],
        cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not (folder / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.003)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return folder


def test_full_disk_while_saving_a_checkpoint(tmp_path: Path):
    """A file-size limit (RLIMIT_FSIZE, as a quota or a full disk) below the checkpoint size: resuming a
    killed run fails at its next checkpoint with one line naming the file; the previous last.pt still
    loads, nothing of the unsaved epoch is logged, the run is FAILED. (A FINISHED run is not resumed at
    all, tests/test_run_ownership.py.)"""
    cwd = tmp_path
    folder = killed_after_its_first_checkpoint(cwd, "disk")
    last = folder / "checkpoints" / "last.pt"
    saved = checkpoint.load(last)["epoch"]
    assert saved < 4, "killed before its end"
    limit = last.stat().st_size // 2
    assert (cwd / "outputs" / "mlflow.db").stat().st_size < limit, "the store itself must stay writable"

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "medexp", "train", f"resume={folder}", "trainer.progress=false"]
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, preexec_fn=small_disk,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(last) in errors[0] and "File too large" in errors[0], errors[0]
    assert checkpoint.load(last)["epoch"] == saved, "the previous last.pt is intact"
    assert not list(last.parent.glob(".*.tmp")), "the half-written temp file was removed"
    client = MlflowClient(store_uri(cwd))
    (run,) = client.search_runs([client.get_experiment_by_name("disk").experiment_id])
    assert run.info.status == "FAILED"
    assert "last.pt" in run.data.tags["error"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, saved + 1)), "the unsaved epoch has no checkpoint, so it is not logged"
