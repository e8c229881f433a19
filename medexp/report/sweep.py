"""The report of a sweep that is not a grid (Optuna: `medexp.sweeper` tag of the parent run is not
BasicSweeper): its trials ranked by objective, the best parameters and value the parent run holds, and
the optimisation history, instead of Fig. 3 / Table 1, whose grid of kernel x loss x lr a sampled study
does not fill (medexp.tracking.sweep_outcome writes the same trial table at the sweep's end)."""

from __future__ import annotations

import math
from pathlib import Path

from medexp.tracking import queries
from medexp.tracking.sweep_outcome import GRID, history_plot, trial_rows, write_trials_csv

BEST_SHOWN = 5


def is_sampled_sweep(parent: dict | None) -> bool:
    """Whether `parent` (a run as a dict) is the parent of a sweep whose sweeper samples (not a grid)."""
    sweeper = (parent or {}).get("tags", {}).get("medexp.sweeper")
    return sweeper is not None and sweeper != GRID


def sweep_files(uri: str, parent: dict, runs: list[dict], out: Path) -> tuple[list[Path], str]:
    """Write trials.csv, trials.md and optimization_history.png for the sweep `parent` into `out`.

    Returns:
        The files, and the Markdown (best trials first) that `medexp report` prints.
    """
    children = sorted((r for r in runs if "kernel" in r["tags"]), key=lambda r: r["start_time"])
    statuses = [
        {"job": i, "status": r["status"], "run_id": r["run_id"], "overrides": r["tags"].get("overrides", "")}
        for i, r in enumerate(children)  # trials in the order they started
    ]
    rows = trial_rows(uri, statuses)
    title = f"sweep {parent['run_id']} ({parent['tags'].get('medexp.sweeper')})"
    ranked = sorted(rows, key=lambda r: (not math.isfinite(r["objective"]), r["objective"]))
    best = {k[len("best.") :]: v for k, v in parent["params"].items() if k.startswith("best.")}
    lines = [f"# {title}", ""]
    if best:
        value = parent["metrics"].get("best_value", math.nan)
        lines += [
            f"best value {value:.4f} with " + ", ".join(f"{k}={v}" for k, v in sorted(best.items())),
            "",
        ]
    lines += [
        f"{len(rows)} trial(s); the best {min(BEST_SHOWN, len(rows))} by objective (1 - best val Dice):",
        "",
        "| trial | objective | status | run | overrides |",
        "|---:|---:|---|---|---|",
    ]
    lines += [
        f"| {r['trial']} | {r['objective']:.4f} | {r['status']} | {r['run_id']} | {r['overrides']} |"
        for r in ranked[:BEST_SHOWN]
    ]
    markdown = "\n".join(lines) + "\n"
    (out / "trials.md").write_text(markdown)
    files = [
        out / "trials.md",
        write_trials_csv(rows, out / "trials.csv"),
        history_plot(rows, out / "optimization_history.png", title),
    ]
    return files, markdown


def parent_of(uri: str, parent_run_id: str | None) -> dict | None:
    return queries.get_run(uri, parent_run_id) if parent_run_id else None
