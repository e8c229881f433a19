"""One Hydra job of `medexp train`: read Hydra's runtime, run the training, record how the job ended.

In a multirun, an error of one job is recorded (status file + FAILED MLflow run) and the sweep goes on;
the SweepParentRun callback summarises the sweep at the end.

Before anything else a job writes its start record (medexp.run.restore.write_record), so that even a kill
before its first checkpoint leaves a folder that `resume` continues, and marks the runs of this host whose
process is gone as KILLED (medexp.tracking.liveness), so that skip_finished and resume see the truth.
It owns its run folder from then to its end (liveness.hold_run_folder; a resume locks the resumed run's
folder instead), stops on SIGTERM as on Ctrl-C, and a parallel launcher's worker stops when its launcher
dies (medexp.run.runtime).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medexp.errors import USER_ERRORS
from medexp.run import gpus, runtime, train
from medexp.run.restore import result_overrides, write_record
from medexp.tracking.liveness import hold_run_folder, mark_dead_runs, release_run_folders
from medexp.tracking.queries import finished_run
from medexp.tracking.runs import check_experiment_name
from medexp.tracking.store import resolve_uri
from medexp.tracking.sweep import LAUNCHER_PID, read_parent, write_status


def hydra_job(cfg: DictConfig) -> float | None:
    """The @hydra.main body: one job of a run or multirun. Errors of one sweep job do not stop the sweep."""
    hc = HydraConfig.get()
    output_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    parent = read_parent(hc.sweep.dir) if multirun else None
    size = os.environ.get("MEDEXP_SWEEP_SIZE", "?")
    job = {
        "choices": dict(hc.runtime.choices),
        "overrides": result_overrides(list(hc.overrides.task)),
        "parent_run_id": parent["run_id"] if parent else None,
        "title": f"job {hc.job.num + 1}/{size}" if multirun else "train",
    }
    status = {"job": hc.job.num if multirun else 0, "overrides": " ".join(job["overrides"])}
    launcher = int(os.environ.get(LAUNCHER_PID, "0"))
    if multirun and launcher not in (0, os.getpid()) and os.getppid() == launcher:  # a joblib worker
        runtime.end_with_parent(launcher)
    with runtime.stop_on_sigterm():
        try:
            return _job(cfg, output_dir, hc.sweep.dir if multirun else None, job, status)
        finally:
            release_run_folders()


def _job(cfg: DictConfig, output_dir: str, sweep_dir: str | None, job: dict, status: dict) -> float | None:
    multirun = sweep_dir is not None
    owner = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 touches the store
    if owner and not cfg.resume:
        try:
            config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # as a checkpoint stores it
        except OmegaConfBaseException:  # reported by train.run with its own message
            config_yaml = OmegaConf.to_yaml(cfg)
        write_record(output_dir, config_yaml, job)
        hold_run_folder(output_dir)  # a resume of this run is refused while this job lives
    if owner:
        mark_dead_runs(resolve_uri(cfg.tracking_uri))
    if multirun and cfg.sweep.skip_finished:
        done = finished_run(cfg.experiment_name, status["overrides"], cfg.tracking_uri)
        if done:
            print(f"{job['title']}: skipped, run {done} already finished ({status['overrides']})")
            write_status(output_dir, {**status, "status": "skipped", "run_id": done})
            return None
    try:
        check_experiment_name(cfg.experiment_name)
        if multirun:
            gpus.pin_gpus(cfg.sweep.gpus_per_job, sweep_dir)
        result = train.run(cfg, output_dir, job)
    except USER_ERRORS as err:
        write_status(output_dir, {**status, "status": "failed", "error": str(err)})
        if not multirun:
            print(f"medexp train: error: {err}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes through Hydra's job runner: one line, no traceback
        print(f"{job['title']} failed: {err}", file=sys.stderr)
        return None
    except Exception as err:
        write_status(output_dir, {**status, "status": "failed", "error": f"{type(err).__name__}: {err}"})
        if not multirun:
            raise
        print(f"{job['title']} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    write_status(
        output_dir,
        {**status, "status": result["status"], "run_id": result["run_id"], "epoch": result.get("epoch")},
    )
    return objective(result)


def objective(result: dict[str, Any]) -> float:
    """The job's return value, which sweepers that optimise read (hydra/sweeper=optuna, which minimises):
    1 - the best validation Dice of the run (NaN, a failed trial for Optuna, when it never validated)."""
    return 1.0 - float(result["best_val_dice"]) if "best_val_dice" in result else math.nan
