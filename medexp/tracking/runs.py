"""One MLflow run per training job (RunTracker, a no-op off rank 0) and finding a run's output folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from medexp.errors import ConfigError, DataError
from medexp.tracking.liveness import process_tags
from medexp.tracking.store import client, experiment_id, resolve_uri, run_context_tags


class RunTracker:
    """One MLflow run for one training job. Every method is a no-op when `active` is False (rank != 0)."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.run_id: str | None = None
        self.ended: str | None = None  # the status this tracker ended its run with
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
        system_metrics: bool = False,
    ) -> str | None:
        """Create a run (nested under parent_run_id), or reopen `run_id` to resume it; it is then also
        MLflow's active (fluent) run of this process, for log_input, log_model and system metrics."""
        if not self.active:
            return None
        from mlflow.entities import RunStatus

        self._client = client(uri)
        if run_id:  # taken over by this process (liveness tags first: a RUNNING run always names its process)
            self.run_id = run_id
            self.set_tags(process_tags())
            self._client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self._activate(uri, system_metrics)
            return run_id
        all_tags = run_context_tags({**process_tags(), **tags})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._client.create_run(
            experiment_id(self._client, experiment), run_name=run_name, tags=all_tags
        )
        self.run_id = run.info.run_id
        self._activate(uri, system_metrics)
        return self.run_id

    def _activate(self, uri: str, system_metrics: bool) -> None:
        """Make the run MLflow's active run in this process, optionally sampling system metrics (CPU,
        memory, disk, network, GPU as MLflow's `system/...` metrics, every
        $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds, default 10)."""
        import mlflow

        mlflow.set_tracking_uri(uri)
        if mlflow.active_run() is not None:  # left over from a job of this process that did not end it
            mlflow.end_run()
        quiet = logging.getLogger("mlflow.system_metrics")  # "started monitoring", "no GPU found": noise
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            mlflow.start_run(run_id=self.run_id, log_system_metrics=system_metrics)
        finally:
            quiet.setLevel(level)

    def log_dataset(self, cases: dict[str, list[dict]], info) -> None:
        """Record the dataset of the run (its cases and split, no data copied; medexp.tracking.inputs)."""
        if self.active:
            from medexp.tracking.inputs import log_dataset

            log_dataset(cases, info)

    def log_model(self, model, cfg, info, register_as: str | None = None) -> str | None:
        """Log `model` (its weights only) as the run's MLflow model `model` (medexp.tracking.models);
        returns its URI."""
        if not self.active:
            return None
        from medexp.tracking.models import log_model

        return log_model(model, cfg, info, register_as=register_as)

    def attach(self, uri: str, run_id: str) -> None:
        """Log into an existing run without changing its status (re-evaluation of a finished run)."""
        if self.active:
            self._client = client(uri)
            self._client.get_run(run_id)  # fails clearly if the run does not exist
            self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params the run does not have yet: a run resumed from scratch keeps those it started with."""
        if not self.active:
            return
        from mlflow.entities import Param

        logged = self._client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
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
        """End the run as FINISHED, FAILED or KILLED (and MLflow's active run, if it is this one).

        Only once: a signal or error after the run has ended (e.g. Ctrl-C while the result table prints)
        must not turn a FINISHED run into KILLED or FAILED."""
        if self.active and self.run_id and self.ended is None:
            import mlflow

            self.ended = status

            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)
            else:
                self._client.set_terminated(self.run_id, status=status)


def check_experiment_name(name: str) -> None:
    """Refuse, in one line, an experiment name MLflow would refuse when the run is created (MLflow's own
    validation: e.g. at most 500 characters).

    Raises:
        ConfigError: naming the key and MLflow's reason.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name

    try:
        _validate_experiment_name(name)
    except MlflowException as err:
        shown = name if len(name) <= 60 else f"{name[:40]}... ({len(name)} characters)"
        raise ConfigError(f"experiment_name={shown}: refused by MLflow: {err.message}") from None


def find_output_dir(run_id: str, uri: str | None = None) -> str:
    """The output folder of a training run (its `medexp.output_dir` tag).

    Raises:
        DataError: when the store has no such run, or the run is not a medexp training run.
    """
    from mlflow.exceptions import MlflowException

    store = resolve_uri(uri)
    try:
        run = client(store).get_run(run_id)
    except MlflowException as err:
        raise DataError(f"run {run_id}: not found in the MLflow store {store}") from err
    if "medexp.output_dir" not in run.data.tags:
        raise DataError(f"run {run_id}: not a medexp training run (no medexp.output_dir tag)")
    return run.data.tags["medexp.output_dir"]


def run_of_output_dir(output_dir: str | Path, experiment: str, uri: str | None = None) -> str | None:
    """Id of the training run of `experiment` whose `medexp.output_dir` tag is `output_dir`, if any (a run
    killed before its first checkpoint is found this way from its folder)."""
    mlflow_client = client(resolve_uri(uri))
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    folder = str(Path(output_dir).resolve()).replace("'", "\\'")
    runs = mlflow_client.search_runs(
        [found.experiment_id], filter_string=f"tags.`medexp.output_dir` = '{folder}'", max_results=1
    )
    return runs[0].info.run_id if runs else None
