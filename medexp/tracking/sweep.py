"""A parent MLflow run per multirun (a Hydra callback) and the jobs' status files in the sweep folder.

A multirun gets a parent run from `SweepParentRun` before any job starts; every job reads its id from the
sweep folder and nests under it, and records how it ended in its own folder for the closing summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from medexp.tracking.liveness import process_tags
from medexp.tracking.store import client, experiment_id, resolve_uri, run_context_tags
from medexp.tracking.sweep_outcome import GRID, jobs_table, log_outcome

PARENT_FILE = "mlflow_parent.json"
STATUS_FILE = "medexp_status.json"
LAUNCHER_PID = "MEDEXP_LAUNCHER_PID"  # the multirun's own process, for its joblib workers (run/runtime.py)


def _refuse_start(config: DictConfig, key: str) -> None:
    """Before Hydra makes the run or sweep folder: a folder that cannot be made, or an experiment name
    MLflow refuses, ends the command with one line (exit 2) instead of Hydra's traceback. Nothing is
    created here (the folder name holds ${now:...}, which Hydra resolves again)."""
    from medexp.errors import MedexpError
    from medexp.tracking.runs import check_experiment_name

    try:
        check_experiment_name(str(config.experiment_name))
        check_folder(OmegaConf.select(config, key), key)
    except MedexpError as err:
        print(f"medexp train: error: {err}", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through Hydra's callbacks: one line, no traceback


def check_folder(folder: str | Path, key: str = "hydra.run.dir") -> None:
    """Refuse, in one line, an output folder that cannot be created: its nearest existing ancestor is not
    a folder, or cannot be written.

    Raises:
        DataError: naming the folder and the ancestor.
    """
    from medexp.errors import DataError

    path = Path(folder).absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise DataError(f"{key}={folder}: cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DataError(f"{key}={folder}: cannot be created: {ancestor} is not writable")


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

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_start(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_start(config, "hydra.sweep.dir")
        os.environ[LAUNCHER_PID] = str(os.getpid())  # its joblib workers end when it dies
        uri = resolve_uri(config.get("tracking_uri"))
        mlflow_client = client(uri)
        sweep_dir = Path(config.hydra.sweep.dir)
        run = mlflow_client.create_run(
            experiment_id(mlflow_client, config.experiment_name),
            run_name=f"sweep {sweep_dir.name}",
            tags=run_context_tags(
                {
                    "medexp.sweep_dir": str(sweep_dir.resolve()),
                    **process_tags(),  # a SIGKILLed sweep's parent is marked KILLED later (liveness)
                }
            ),
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
        if statuses:
            print(jobs_table(statuses))
        if parent:
            sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or GRID).rpartition(".")[2]
            try:  # the study's outcome on the parent run (Optuna: best params and value, trials, history)
                log_outcome(parent, sweeper, sweep_dir, statuses)
            except Exception as err:  # noqa: BLE001 - the jobs' runs are logged; say so, end the parent
                print(f"warning: the sweep's outcome was not logged to run {parent['run_id']}: {err}")
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
