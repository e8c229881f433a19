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
        run = self._client.create_run(
            experiment_id(self._client, experiment), run_name=run_name, tags=all_tags
        )
        self.run_id = run.info.run_id
        return self.run_id

    def attach(self, uri: str, run_id: str) -> None:
        """Log into an existing run without changing its status (re-evaluation of a finished run)."""
        if self.active:
            self._client = client(uri)
            self._client.get_run(run_id)  # fails clearly if the run does not exist
            self.run_id = run_id

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

    def has_step(self, key: str, step: int) -> bool:
        """Whether metric `key` already has a value at `step` (resume must not log a step twice)."""
        if not self.active:
            return True
        return any(m.step == step for m in self._client.get_metric_history(self.run_id, key))

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
    active: dict | None = None  # {"run_id", "uri", "experiment"} of the parent while its multirun runs

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
        SweepParentRun.active = record

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
        SweepParentRun.active = None

    @staticmethod
    def abandon(status: str) -> None:
        """End the parent run of a multirun that stopped before its end (Ctrl-C, or an error Hydra raises
        between jobs, which skips on_multirun_end) as `status`, so that no parent is left RUNNING."""
        record, SweepParentRun.active = SweepParentRun.active, None
        if record:
            client(record["uri"]).set_terminated(record["run_id"], status=status)


def find_output_dir(run_id: str, uri: str | None = None) -> str:
    """The output folder of a training run (its `medexp.output_dir` tag).

    Raises:
        DataError: when the store has no such run, or the run is not a medexp training run.
    """
    from mlflow.exceptions import MlflowException

    from medexp.data.base import DataError

    store = resolve_uri(uri)
    try:
        run = client(store).get_run(run_id)
    except MlflowException as err:
        raise DataError(f"run {run_id}: not found in the MLflow store {store}") from err
    if "medexp.output_dir" not in run.data.tags:
        raise DataError(f"run {run_id}: not a medexp training run (no medexp.output_dir tag)")
    return run.data.tags["medexp.output_dir"]


# --- read-side helpers for report / ui / plots: plain dicts out, so no other module touches mlflow objects


def run_to_dict(run) -> dict[str, Any]:
    """A plain-dict view of an MLflow Run: ids, status, start time, tags, params and latest metrics."""
    return {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "start_time": run.info.start_time or 0,
        "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
    }


def list_experiments(uri: str) -> dict[str, str]:
    """{experiment name: experiment id} of the active experiments in the store."""
    found, token = {}, None
    while True:
        page = client(uri).search_experiments(max_results=1000, page_token=token)
        found.update({e.name: e.experiment_id for e in page})
        token = page.token
        if not token:
            return found


def search_runs(uri: str, experiment_ids: list[str], filter_string: str = "") -> list[dict[str, Any]]:
    """Every run of `experiment_ids` matching an MLflow `filter_string`, as plain dicts (all pages)."""
    if not experiment_ids:
        return []
    mlflow_client = client(uri)
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(run_to_dict(r) for r in page)
        token = page.token
        if not token:
            return runs


def get_run(uri: str, run_id: str) -> dict[str, Any] | None:
    """One run as a plain dict, or None if the store has no run with that id."""
    try:
        return run_to_dict(client(uri).get_run(run_id))
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST) or a malformed id
        return None


def metric_history(uri: str, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...] sorted by step} for the metrics `keys` of one run (missing keys omitted)."""
    mlflow_client = client(uri)
    out = {}
    for key in keys:
        history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, key))
        if history:
            out[key] = history
    return out


def log_artifacts(uri: str, run_id: str, paths: list[str | Path], artifact_path: str | None = None) -> None:
    """Attach local files to an existing (possibly finished) run."""
    mlflow_client = client(uri)
    for path in paths:
        mlflow_client.log_artifact(run_id, str(path), artifact_path)


def finished_run(experiment: str, overrides: str, uri: str | None = None) -> str | None:
    """Id of a FINISHED child run of `experiment` with exactly these job overrides (for skip_finished)."""
    mlflow_client = client(resolve_uri(uri))
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    escaped = overrides.replace("'", "\\'")
    runs = mlflow_client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.overrides = '{escaped}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
