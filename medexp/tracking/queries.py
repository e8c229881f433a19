"""Read-side helpers for report, ui, plots and sweeps: plain dicts out, so no other package touches mlflow
objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medexp.tracking.store import client, resolve_uri


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
