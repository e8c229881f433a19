"""`medexp report`: aggregate MLflow runs into the analogues of Wong & Moradi 2022 Fig. 3 and Table 1.

- Fig. 3: mean test Dice (`test/dice_mean`, the foreground-label average) against log10 learning rate, one
  panel per kernel type, one line per loss, error bars = standard deviation over splits; its numbers as
  Markdown and CSV (`fig3_dice_vs_lr.md`, `.csv`).
- Table 1: per-label test Dice (`test/dice/<label>`) and their average as mean±std over splits at one
  learning rate, for every kernel x loss, with each model's parameter count (param `model.num_parameters`);
  written as Markdown (percent, like the paper) and CSV (fractions, full precision).

Which runs count:
- Training runs (those with a `kernel` tag; sweep parent runs have none) of the chosen sweep (tag `sweep_id`)
  or experiment whose MLflow status is FINISHED. FAILED, KILLED and still RUNNING runs are left out.
- A diverged run (tag `diverged=true`) is FINISHED too and counts with whatever test metrics it logged:
  those of its best checkpoint before the loss became NaN. One that diverged before its first validation
  logged no test metrics and adds nothing to the means; it is still counted in the `diverged` column, so a
  cell whose runs all diverged shows as missing with e.g. "0/2 (2 diverged)".
- If one cell (kernel, loss, lr, split) has several runs (an experiment holding a repeated sweep), only the
  latest started counts, so no split is counted twice. If runs differ in head, model or dataset, those
  choices become part of the row key (column `variant`) instead of being averaged together.
- Statistics over splits: mean and sample standard deviation (ddof=1; blank for a single value). A label
  whose Dice is NaN in a run (absent from both truth and prediction of every test case, the empty-label
  rule of medexp.evaluation.metrics) is skipped for that run; the `test/dice/<label>_n` counts are not
  labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medexp.config.paths import output_root
from medexp.errors import ReportError
from medexp.report.aggregate import cells, figure_data, learning_rates, parameter_counts
from medexp.report.figures import dice_vs_lr
from medexp.report.select import label_names, select_runs, to_records
from medexp.report.sweep import is_sampled_sweep, parent_of, sweep_files
from medexp.report.tables import write_figure_tables, write_runs_csv, write_table_csv, write_table_markdown
from medexp.tracking import queries


@dataclass
class Report:
    """What `make_report` wrote and where it logged it."""

    files: list[Path]
    source: str
    runs: int
    learning_rates: list[float]
    logged_to: str | None
    markdown: str
    lr: float = 1e-3
    runs_at_lr: int = 0

    def summary(self) -> str:
        """What `medexp report` prints: the table, the files, where they were logged, and warnings."""
        lines = [self.markdown, f"{self.runs} run(s) from {self.source}"]
        if not self.runs_at_lr:
            found = ", ".join(f"{v:g}" for v in self.learning_rates)
            lines.append(
                f"warning: no run at lr {self.lr:g}; the runs have lr {found} (choose one with --lr)"
            )
        lines += [f"wrote {path}" for path in self.files]
        if self.logged_to:
            lines.append(f"logged to MLflow run {self.logged_to} (artifacts report/)")
        return "\n".join(lines)


def make_report(
    uri: str,
    *,
    experiment: str | None = None,
    sweep: str | None = None,
    lr: float = 1e-3,
    out_dir: str | Path | None = None,
    log: bool = True,
) -> Report:
    """Select runs, write Fig. 3 (PNG), Table 1 (Markdown, CSV) and runs.csv, log them to the sweep's parent.

    The files are logged (artifact folder `report/`) to the parent run of `sweep`, or, without --sweep, to
    the one parent all counted runs share, if they do.
    """
    selection = select_runs(uri, experiment, sweep)
    parent = parent_of(uri, selection.parent_run_id)
    if is_sampled_sweep(parent):  # Optuna: trials and history, not a kernel x loss x lr grid
        return _sweep_report(uri, parent, selection, out_dir, log)
    labels = label_names(selection.runs)
    records = to_records(selection.runs, labels)
    if not records:
        statuses = sorted({r["status"] for r in selection.runs if "kernel" in r["tags"]})
        found = f" (training runs found: {', '.join(statuses)})" if statuses else ""
        raise ReportError(f"no FINISHED training runs in {selection.source}{found}")
    default_out = Path(output_root(uri)) / "reports" / selection.name  # next to a sqlite store
    out = Path(out_dir) if out_dir else default_out
    out.mkdir(parents=True, exist_ok=True)
    table = cells(records, labels, lr)
    params = parameter_counts(records)
    stem = f"table1_lr{lr:g}"
    panels = figure_data(records)
    files = [
        dice_vs_lr(panels, out / "fig3_dice_vs_lr.png", title=selection.source),
        write_table_markdown(out / f"{stem}.md", table, params, labels, lr, selection.source),
        write_table_csv(out / f"{stem}.csv", table, params, labels, lr),
        write_runs_csv(out / "runs.csv", records, labels),
        *write_figure_tables(
            out / "fig3_dice_vs_lr.md", out / "fig3_dice_vs_lr.csv", panels, learning_rates(records),
            selection.source,
        ),
    ]  # fmt: skip
    parent = selection.parent_run_id
    if parent is None and len({r.parent_run_id for r in records}) == 1:
        parent = records[0].parent_run_id
    if log and parent:
        queries.log_artifacts(uri, parent, files, "report")
    at_lr = sum(cell.runs for cell in table.values())
    rates, logged = learning_rates(records), parent if log else None
    return Report(files, selection.source, len(records), rates, logged, files[1].read_text(), lr, at_lr)


def _sweep_report(uri: str, parent: dict, selection, out_dir, log: bool) -> Report:
    """The report of a sampled sweep (medexp.report.sweep), written and logged like the grid's."""
    if not any("kernel" in r["tags"] for r in selection.runs):
        raise ReportError(f"no training runs in {selection.source}")
    out = Path(out_dir) if out_dir else Path(output_root(uri)) / "reports" / selection.name
    out.mkdir(parents=True, exist_ok=True)
    files, markdown = sweep_files(uri, parent, selection.runs, out)
    if log:
        queries.log_artifacts(uri, parent["run_id"], files, "report")
    runs = sum("kernel" in r["tags"] for r in selection.runs)
    logged = parent["run_id"] if log else None
    return Report(files, selection.source, runs, [], logged, markdown, runs_at_lr=runs)
