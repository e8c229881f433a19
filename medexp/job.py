"""One Hydra job of `medexp train`: read Hydra's runtime, run the training, record how the job ended.

In a multirun, an error of one job is recorded (status file + FAILED MLflow run) and the sweep goes on;
the SweepParentRun callback summarises the sweep at the end.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from medexp.config import ConfigError
from medexp.data.base import DataError

USER_ERRORS = (ConfigError, DataError)

NOT_RESULT_KEYS = ("sweep.", "hydra.", "hydra/", "trainer.progress")


def result_overrides(task_overrides: list[str]) -> list[str]:
    """The overrides that define a job's result (its identity for sweep.skip_finished and the MLflow tag)."""
    return [o for o in task_overrides if not o.lstrip("+~").startswith(NOT_RESULT_KEYS)]


def hydra_job(cfg: DictConfig) -> dict[str, Any] | None:
    """The @hydra.main body: one job of a run or multirun. Errors of one sweep job do not stop the sweep."""
    from medexp import launcher, tracking, train

    hc = HydraConfig.get()
    output_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    parent = tracking.read_parent(hc.sweep.dir) if multirun else None
    size = os.environ.get("MEDEXP_SWEEP_SIZE", "?")
    job = {
        "choices": dict(hc.runtime.choices),
        "overrides": result_overrides(list(hc.overrides.task)),
        "parent_run_id": parent["run_id"] if parent else None,
        "title": f"job {hc.job.num + 1}/{size}" if multirun else "train",
    }
    status = {"job": hc.job.num if multirun else 0, "overrides": " ".join(job["overrides"])}
    if multirun and cfg.sweep.skip_finished:
        done = tracking.finished_run(cfg.experiment_name, status["overrides"], cfg.tracking_uri)
        if done:
            print(f"{job['title']}: skipped, run {done} already finished ({status['overrides']})")
            tracking.write_status(output_dir, {**status, "status": "skipped", "run_id": done})
            return None
    try:
        if multirun:
            launcher.pin_gpus(cfg.sweep.gpus_per_job, hc.sweep.dir)
        result = train.run(cfg, output_dir, job)
    except USER_ERRORS as err:
        tracking.write_status(output_dir, {**status, "status": "failed", "error": str(err)})
        if not multirun:
            print(f"medexp train: error: {err}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes through Hydra's job runner: one line, no traceback
        print(f"{job['title']} failed: {err}", file=sys.stderr)
        return None
    except Exception as err:
        tracking.write_status(
            output_dir, {**status, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        )
        if not multirun:
            raise
        print(f"{job['title']} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    tracking.write_status(
        output_dir,
        {**status, "status": result["status"], "run_id": result["run_id"], "epoch": result.get("epoch")},
    )
    return result
