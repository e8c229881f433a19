"""What a finished sweep logs to its parent run, and the trial table `medexp report` shows for a sweep that
is not a grid (docs/design.md §9).

Every sweep's parent gets the tag `medexp.sweeper` (the Hydra sweeper's class: BasicSweeper for a grid).
A sampling sweeper's (Optuna) parent also gets what the study found: the best parameters as params
`best.<key>`, the best objective as metric `best_value` (both from the sweeper's
optimization_results.yaml), and as artifacts under `sweep/` the trial table `trials.csv` and the
optimisation history `optimization_history.png` (each trial's objective and the best so far, against
the trial number). A trial's objective is what its job returned (medexp.run.job.objective):
1 - the best validation Dice (`val/dice_mean`) of its run, minimised.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from medexp.tracking import queries

GRID = "BasicSweeper"
RESULTS_FILE = "optimization_results.yaml"  # written by hydra-optuna-sweeper into the sweep folder
TRIAL_COLUMNS = ("trial", "status", "objective", "best_so_far", "run_id", "overrides")


def trial_rows(uri: str, statuses: list[dict]) -> list[dict]:
    """One row per job (trial), in job order: its status, objective (NaN without a validation), the best
    objective up to it, its run id and overrides."""
    rows, best = [], math.inf
    for s in sorted(statuses, key=lambda s: int(s.get("job", 0))):
        objective = math.nan
        if s.get("run_id"):
            history = queries.metric_history(uri, s["run_id"], ["val/dice_mean"]).get("val/dice_mean", [])
            finite = [v for _, v in history if math.isfinite(v)]
            objective = 1.0 - max(finite) if finite else math.nan
        if math.isfinite(objective):
            best = min(best, objective)
        rows.append(
            {
                "trial": int(s.get("job", 0)),
                "status": s.get("status", "?"),
                "objective": objective,
                "best_so_far": best if math.isfinite(best) else math.nan,
                "run_id": s.get("run_id", ""),
                "overrides": s.get("overrides", ""),
            }
        )
    return rows


def write_trials_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def history_plot(rows: list[dict], path: Path, title: str) -> Path:
    """Optimisation history: each trial's objective (dots) and the best so far (steps), as Optuna's
    plot_optimization_history draws it, in matplotlib (no plotly needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["trial"] for r in rows]
    ax.plot(x, [r["objective"] for r in rows], "o", label="objective (1 - best val Dice)")
    ax.step(x, [r["best_so_far"] for r in rows], where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (minimised)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_outcome(parent: dict, sweeper: str, sweep_dir: Path, statuses: list[dict]) -> None:
    """Log the sweep's outcome to its parent run `parent` ({"run_id", "uri", ...}); see the module doc."""
    uri, run_id = parent["uri"], parent["run_id"]
    mlflow_client = queries.client(uri)
    mlflow_client.set_tag(run_id, "medexp.sweeper", sweeper)
    results = sweep_dir / RESULTS_FILE
    if sweeper == GRID or not results.exists():
        return
    study = yaml.safe_load(results.read_text()) or {}
    for key, value in (study.get("best_params") or {}).items():
        mlflow_client.log_param(run_id, f"best.{key}", value)
    if study.get("best_value") is not None:
        mlflow_client.log_metric(run_id, "best_value", float(study["best_value"]))
    rows = trial_rows(uri, statuses)
    files = [
        write_trials_csv(rows, sweep_dir / "trials.csv"),
        history_plot(rows, sweep_dir / "optimization_history.png", f"sweep {run_id}"),
    ]
    queries.log_artifacts(uri, run_id, files, "sweep")


def jobs_table(statuses: list[dict]) -> str:
    """The sweep's closing table, plain text (a log keeps it whole): one line per job with its status, run
    id and overrides, after the one line each job printed when it ended (medexp.run.progress)."""
    rows = [("job", "status", "MLflow run", "overrides")]
    for s in sorted(statuses, key=lambda s: int(s.get("job", 0))):
        rows.append(
            (str(s.get("job", "?")), s.get("status", "?"), s.get("run_id") or "-", s.get("overrides", ""))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]).rstrip() for r in rows
    )
