"""MLflow tracking: the only module that imports mlflow. Inactive (a no-op) off rank 0.

Store resolution is the same for every command (DESIGN 9): an explicit `tracking_uri`, else the
MLFLOW_TRACKING_URI environment variable, else sqlite:///outputs/mlflow.db with artifacts under
outputs/mlartifacts. A multirun gets a parent run from the `SweepParentRun` Hydra callback; every job
reads its id from the sweep folder and nests under it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

DEFAULT_DB = Path("outputs") / "mlflow.db"
DEFAULT_ARTIFACTS = Path("outputs") / "mlartifacts"
PARENT_FILE = "mlflow_parent.json"
STATUS_FILE = "medexp_status.json"


def resolve_uri(uri: str | None = None) -> str:
    """tracking_uri if given, else $MLFLOW_TRACKING_URI, else the project's sqlite store (absolute path)."""
    if uri:
        return str(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def client(uri: str):
    """An MlflowClient on `uri` (imported lazily: mlflow is slow to import)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    """Id of experiment `name`, created (artifacts under outputs/ for local stores) if missing."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if mlflow_client.tracking_uri.startswith("sqlite:"):
        location = DEFAULT_ARTIFACTS.resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a parallel job
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    """HEAD of the git checkout medexp runs from, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """One MLflow run for one training job. Every method is a no-op when `active` is False (rank != 0)."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.run_id: str | None = None
        self._client = None

    def start(
        self,
        *,
        uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        parent_run_id: str | None = None,
        run_id: str | None = None,
    ) -> str | None:
        """Create a run (nested under parent_run_id), or reopen `run_id` to resume it."""
        if not self.active:
            return None
        from mlflow.entities import RunStatus

        self._client = client(uri)
        if run_id:
            self._client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.run_id = run_id
            return run_id
        all_tags = {"mlflow.source.git.commit": git_commit(), **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._client.create_run(experiment_id(self._client, experiment), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        if self.active and self.run_id:
            self._client.set_terminated(self.run_id, status=status)


def read_parent(sweep_dir: str | Path) -> dict | None:
    """The parent-run record the SweepParentRun callback left in the sweep folder, if any."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_status(output_dir: str | Path, status: dict) -> None:
    """Record how a job ended (finished, diverged, failed) for the sweep summary."""
    path = Path(output_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(status))


class SweepParentRun(Callback):
    """Hydra callback: a parent MLflow run per multirun, created before any job starts.

    Creating it also creates the tracking database (and runs its migrations) once, before parallel jobs
    could race to do so. At the end the parent is marked FINISHED, or FAILED if any job failed, and the
    jobs' outcomes are summarised.
    """

    failures: list[dict] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = resolve_uri(config.get("tracking_uri"))
        mlflow_client = client(uri)
        sweep_dir = Path(config.hydra.sweep.dir)
        run = mlflow_client.create_run(
            experiment_id(mlflow_client, config.experiment_name),
            run_name=f"sweep {sweep_dir.name}",
            tags={"medexp.sweep_dir": str(sweep_dir.resolve()), "mlflow.source.git.commit": git_commit()},
        )
        mlflow_client.set_tag(run.info.run_id, "sweep_id", run.info.run_id)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": run.info.run_id, "uri": uri, "experiment": config.experiment_name}
        (sweep_dir / PARENT_FILE).write_text(json.dumps(record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        parent = read_parent(sweep_dir)
        statuses = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{STATUS_FILE}"))]
        SweepParentRun.failures = [s for s in statuses if s.get("status") == "failed"]
        diverged = [s for s in statuses if s.get("status") == "diverged"]
        finished = sum(s.get("status") == "finished" for s in statuses)
        print(
            f"sweep {sweep_dir}: {len(statuses)} job(s): {finished} finished, {len(diverged)} diverged, "
            f"{len(SweepParentRun.failures)} failed"
        )
        for s in SweepParentRun.failures:
            print(f"  failed: job {s.get('job')} ({s.get('overrides')}): {s.get('error')}")
        for s in diverged:
            print(f"  diverged: job {s.get('job')} ({s.get('overrides')}) at epoch {s.get('epoch')}")
        if parent:
            status = "FAILED" if SweepParentRun.failures else "FINISHED"
            client(parent["uri"]).set_terminated(parent["run_id"], status=status)


def find_output_dir(run_id: str, uri: str | None = None) -> str:
    """The output folder of a training run (its `medexp.output_dir` tag)."""
    run = client(resolve_uri(uri)).get_run(run_id)
    return run.data.tags["medexp.output_dir"]
