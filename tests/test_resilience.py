"""Scale and resilience (docs/design.md §9): DDP on CPU (gloo), divergence and failures in sweeps, skipping
finished jobs, parallel jobs on one sqlite store with GPU slots, Ctrl-C of a sweep. SIGKILL at any moment
and a full disk: tests/test_kill_anywhere.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e  # every test here runs the real `medexp` command

# Deterministic, comparable runs: no augmentation, no dropout, an even number of training cases.
EXACT = [*TINY, "dataset.num_cases=10", "augment=none", "model.dropout=0.0", "trainer.max_epochs=2"]


def runs_of(cwd: Path, experiment: str):
    client = MlflowClient(store_uri(cwd))
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def losses(client, run) -> list[float]:
    return [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    ]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(workdir: Path):
    one = run_medexp(["train", *EXACT, "trainer.batch_size=2", "experiment_name=ddp1"], cwd=workdir)
    two = run_medexp(
        ["train", *EXACT, "trainer.batch_size=1", "trainer.devices=2", "experiment_name=ddp2"], cwd=workdir
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    client, (run1,) = runs_of(workdir, "ddp1")
    _, runs2 = runs_of(workdir, "ddp2")
    assert len(runs2) == 1, "one MLflow run for two processes"
    run2 = runs2[0]
    assert run2.info.status == "FINISHED"
    assert run2.data.tags["world_size"] == "2" and run2.data.tags["ranks_in_sync"] == "true"
    curve1, curve2 = losses(client, run1), losses(client, run2)
    assert len(curve1) == len(curve2) == 2
    assert curve2 == pytest.approx(curve1, rel=2e-3), "same global batches, gradients averaged by DDP"


def ctrl_c_reaches_it() -> None:
    """In the child before exec: SIGINT as in a terminal. A shell without job control starts background
    commands with SIGINT ignored, and Python then keeps it ignored, so a test run from such a shell (a CI
    script's `cmd &`) would see a sweep that Ctrl-C cannot stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_until_checkpoint(
    args: list[str], workdir: Path, pattern: str
) -> tuple[subprocess.Popen, Path | None]:
    """Start `args` in workdir and wait (up to 300 s) until a file matching outputs/`pattern` is written
    after the process started; (process, that file or None if the process ended or time ran out)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        args, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=ctrl_c_reaches_it,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        fresh = [p for p in (workdir / "outputs").glob(pattern) if p.stat().st_mtime > proc_start(proc)]
        if fresh:
            return proc, fresh[0]
        time.sleep(0.1)
    return proc, None


def proc_start(proc: subprocess.Popen) -> float:
    """Wall-clock start time of a child process (from /proc), to ignore checkpoints of earlier tests."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    return boot + start - 1.0


def test_sweep_with_a_diverging_and_a_failing_job_finishes_the_others(workdir: Path):
    # lr=1e30 blows the weights up: NaN loss = divergence (a result). dropout=2 raises in torch: a real error.
    args = [
        "train",
        "-m",
        "lr=1e-3,1e30",
        "model.dropout=0.0,2.0",
        *TINY,
        "trainer.max_epochs=1",
        "experiment_name=div",
    ]
    result = run_medexp(args, cwd=workdir)
    assert result.returncode == 1, "failures make the sweep exit non-zero"
    assert "4 job(s): 1 finished, 1 diverged, 2 failed" in result.stdout
    assert "Traceback" not in result.stderr
    client, runs = runs_of(workdir, "div")
    children = {
        (r.data.tags["lr"], r.data.params.get("model.dropout")): r
        for r in runs
        if "mlflow.parentRunId" in r.data.tags
    }
    ok, diverged = children[("0.001", "0.0")], children[("1e+30", "0.0")]
    assert ok.info.status == "FINISHED" and ok.data.tags["diverged"] == "false"
    assert diverged.info.status == "FINISHED" and diverged.data.tags["diverged"] == "true"
    failed = [r for r in runs if r.info.status == "FAILED" and "mlflow.parentRunId" in r.data.tags]
    assert len(failed) == 2
    assert all("dropout probability" in r.data.tags["error"] for r in failed)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"

    # Restarting the same sweep with skip_finished re-runs only the jobs without a FINISHED run.
    again = run_medexp([*args, "sweep.skip_finished=true"], cwd=workdir)
    assert again.stdout.count("skipped, run") == 2, again.stdout
    _, runs_after = runs_of(workdir, "div")
    ok_runs = [r for r in runs_after if r.data.tags.get("overrides") == ok.data.tags["overrides"]]
    assert len(ok_runs) == 1, "the finished job was not run again"


def test_four_parallel_jobs_on_one_sqlite_store_lose_nothing(workdir: Path):
    """4 jobs, 2 at a time (joblib), one sqlite store: every job's run FINISHED with every epoch's metrics;
    each parallel worker holds its own GPU slot (two fake GPUs)."""
    args = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweep.gpus_per_job=1"]
    args += ["seed=1,2,3,4", *TINY, "eval.metrics=[dice]", "experiment_name=pin"]
    result = run_medexp(args, cwd=workdir, env={"MEDEXP_GPU_COUNT": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 job(s): 4 finished, 0 diverged, 0 failed" in result.stdout
    client, runs = runs_of(workdir, "pin")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["seed"] for r in children) == ["1", "2", "3", "4"]
    assert all(r.info.status == "FINISHED" for r in runs), "children and the parent"
    labels = children[0].data.tags["label_names"].split(",")[1:]  # foreground
    per_epoch = ["train/loss", "train/lr", "val/dice_mean", *(f"val/dice/{name}" for name in labels)]
    for run in children:
        for key in per_epoch:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == [1, 2], f"{key} of seed {run.data.tags['seed']}: {steps}"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test/dice_mean")] == [2]
    assert {r.data.tags["cuda_visible_devices"] for r in children} == {"0", "1"}


def test_ctrl_c_during_a_sweep_leaves_no_run_running(workdir: Path):
    # SIGINT (Ctrl-C) while the first of two jobs trains: that job's run ends KILLED, the parent run too
    # (Hydra skips the end-of-sweep callback), the second job never starts, and the exit code is not 0.
    args = [sys.executable, "-m", "medexp", "train", "-m", "seed=1,2", *TINY, "trainer.max_epochs=500"]
    args += ["experiment_name=interrupted"]
    proc, _ = start_until_checkpoint(args, workdir, "multirun/*/*/0/checkpoints/last.pt")
    assert proc.poll() is None, "the sweep was still running when interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    client, runs = runs_of(workdir, "interrupted")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED"], stderr.decode()[-2000:]
    assert [r.info.status for r in children] == ["KILLED"], "only the first job started"


def descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of `pid`, from /proc."""
    from medexp.tracking.liveness import start_ticks

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        ticks = start_ticks(child)
        if ticks:
            found[child] = ticks
        todo += children.get(child, [])
    return found


def is_loky_worker(pid: int) -> bool:
    try:
        return b"LokyProcess" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def still_alive(processes: dict[int, str]) -> list[int]:
    from medexp.tracking.liveness import start_ticks

    return [pid for pid, ticks in processes.items() if start_ticks(pid) == ticks]


def wait_gone(processes: dict[int, str], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while still_alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return still_alive(processes)


def test_control_sigkill_to_a_plain_joblib_parent_leaves_its_workers_running(tmp_path: Path):
    code = "from joblib import Parallel, delayed; import time; Parallel(n_jobs=2)(delayed(time.sleep)(60) "
    code += "for _ in range(2))"
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while sum(map(is_loky_worker, descendants(parent.pid))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = {pid: t for pid, t in descendants(parent.pid).items() if is_loky_worker(pid)}
    parent.kill()
    parent.wait()
    try:
        assert len(still_alive(workers)) == 2, "without a watch, the workers outlive their parent"
    finally:
        for pid in still_alive(workers):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_to_a_joblib_multirun_ends_its_workers_and_their_runs(workdir: Path):
    """SIGKILL to the parent of a 2-job joblib multirun while its jobs train: each worker notices that its
    launcher is gone (medexp.run.runtime.end_with_parent), ends its job as on SIGTERM (run KILLED) and exits
    within seconds; none is left reparented to init holding its memory."""
    args = [sys.executable, "-m", "medexp", "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    args += ["seed=1,2", *TINY, "trainer.max_epochs=500", "experiment_name=orphans"]
    proc, ckpt = start_until_checkpoint(args, workdir, "multirun/*/*/*/checkpoints/last.pt")
    assert ckpt is not None and proc.poll() is None, "a job was training when the parent was killed"
    workers = {pid: t for pid, t in descendants(proc.pid).items() if is_loky_worker(pid)}
    assert len(workers) == 2, workers
    proc.kill()
    proc.wait()
    left = wait_gone(workers, timeout=60)
    for pid in left:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == [], "the launcher's workers outlived it"
    _, runs = runs_of(workdir, "orphans")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    # KILLED by the watch; a worker that first writes to its dead launcher's pipe fails on it and ends FAILED
    # (seen once under a loaded CI run): either way marked, none left RUNNING
    statuses = [r.info.status for r in children]
    assert children and set(statuses) <= {"KILLED", "FAILED"} and "KILLED" in statuses, statuses
