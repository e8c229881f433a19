"""`medexp report`: aggregate MLflow runs into the analogues of Wong & Moradi 2022 Fig. 3 and Table 1.

- Fig. 3: mean test Dice (`test/dice_mean`, the foreground-label average) against log10 learning rate, one
  panel per kernel type, one line per loss, error bars = standard deviation over splits.
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
  whose Dice is NaN in a run (absent from its test cases) is skipped for that run.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medexp import tracking

KERNEL_ORDER = ("conventional", "gabor", "mixed")
LOSS_ORDER = ("pcc", "dice", "ce")
VARIANT_TAGS = ("head", "model", "dataset")
LR_REL_TOL = 0.01  # --lr 3.16e-4 matches 10**-3.5
AVERAGE = "average"
MISSING = "–"


class ReportError(Exception):
    """A user error (unknown experiment or sweep, no runs): reported as one line."""


@dataclass
class Record:
    """One counted training run, reduced to what the report needs."""

    run_id: str
    kernel: str
    loss: str
    variant: str
    lr: float
    split: str
    diverged: bool
    num_parameters: int | None
    dice: dict[str, float]  # label -> test Dice, plus AVERAGE -> test/dice_mean
    start_time: int = 0
    parent_run_id: str | None = None

    @property
    def series(self) -> tuple[str, str, str]:
        return (self.kernel, self.loss, self.variant)


@dataclass
class Cell:
    """Aggregate of the runs of one (series, lr): per-label mean and std over splits."""

    runs: int = 0
    diverged: int = 0
    splits: list[str] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)


@dataclass
class Selection:
    """The runs a report is made of and where they came from."""

    runs: list[dict]
    source: str  # human-readable: "sweep <id> (experiment <name>)" or "experiment <name>"
    name: str  # short name for the default output folder
    parent_run_id: str | None = None


def select_runs(uri: str, experiment: str | None = None, sweep: str | None = None) -> Selection:
    """The runs of a sweep (by parent run id), of an experiment, or, with neither, of the latest sweep."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise ReportError(f"no MLflow store at {uri} (train first, or give --tracking-uri)")
    experiments = tracking.list_experiments(uri)
    names = {v: k for k, v in experiments.items()}
    if experiment is not None and experiment not in experiments:
        known = ", ".join(sorted(experiments)) or "none"
        raise ReportError(f"unknown experiment {experiment!r} in {uri} (known: {known})")
    if sweep is None and experiment is not None:
        runs = tracking.search_runs(uri, [experiments[experiment]])
        return Selection(runs, f"experiment {experiment}", experiment)
    if sweep is None:
        sweep = _latest_sweep(uri, list(experiments.values()))
    parent = tracking.get_run(uri, sweep)
    if parent is None:
        raise ReportError(f"unknown sweep {sweep!r}: no run with that id in {uri}")
    exp_name = names.get(parent["experiment_id"], parent["experiment_id"])
    if experiment is not None and exp_name != experiment:
        raise ReportError(f"sweep {sweep} belongs to experiment {exp_name!r}, not {experiment!r}")
    runs = tracking.search_runs(uri, [parent["experiment_id"]], f"tags.sweep_id = '{sweep}'")
    runs = [r for r in runs if r["run_id"] != sweep]
    return Selection(runs, f"sweep {sweep} (experiment {exp_name})", f"sweep-{sweep[:8]}", sweep)


def _latest_sweep(uri: str, experiment_ids: list[str]) -> str:
    """Id of the most recently started sweep parent run in the store."""
    parents = [
        r for r in tracking.search_runs(uri, experiment_ids) if r["tags"].get("sweep_id") == r["run_id"]
    ]
    if not parents:
        raise ReportError(f"no sweep in {uri}: name one with --sweep ID or --experiment NAME")
    return max(parents, key=lambda r: r["start_time"])["run_id"]


def label_names(runs: list[dict]) -> list[str]:
    """Foreground labels in dataset order: the runs' `label_names` tags, then any other test/dice/<label>."""
    order: list[str] = []
    for run in runs:
        for name in run["tags"].get("label_names", "").split(",")[1:]:  # first is the background
            if name and name not in order:
                order.append(name)
    for run in runs:
        for key in sorted(run["metrics"]):
            if key.startswith("test/dice/") and key[len("test/dice/") :] not in order:
                order.append(key[len("test/dice/") :])
    return order


def to_records(runs: list[dict], labels: list[str]) -> list[Record]:
    """FINISHED training runs as Records, the latest run per (series, lr, split) only."""
    training = [r for r in runs if r["status"] == "FINISHED" and "kernel" in r["tags"]]
    varying = [t for t in VARIANT_TAGS if len({r["tags"].get(t, "") for r in training}) > 1]
    latest: dict[tuple, Record] = {}
    for run in training:
        tags, metrics = run["tags"], run["metrics"]
        dice = {label: metrics[f"test/dice/{label}"] for label in labels if f"test/dice/{label}" in metrics}
        if "test/dice_mean" in metrics:
            dice[AVERAGE] = metrics["test/dice_mean"]
        n_params = run["params"].get("model.num_parameters")
        record = Record(
            run_id=run["run_id"],
            kernel=tags["kernel"],
            loss=tags.get("loss", "?"),
            variant=" ".join(f"{t}={tags.get(t, '?')}" for t in varying),
            lr=float(run["params"].get("lr", tags.get("lr", "nan"))),
            split=tags.get("split", run["params"].get("split", "?")),
            diverged=tags.get("diverged") == "true",
            num_parameters=int(n_params) if n_params else None,
            dice=dice,
            start_time=run["start_time"],
            parent_run_id=run["parent_run_id"],
        )
        key = (record.series, f"{record.lr:.6g}", record.split)
        if key not in latest or record.start_time > latest[key].start_time:
            latest[key] = record
    return list(latest.values())


def aggregate(records: list[Record], labels: list[str]) -> Cell:
    """Mean and sample std over splits of each label's Dice (and the average) for one cell's records."""
    cell = Cell(runs=len(records), diverged=sum(r.diverged for r in records))
    cell.splits = sorted({r.split for r in records}, key=lambda s: (len(s), s))
    for label in [*labels, AVERAGE]:
        values = np.array([r.dice[label] for r in records if math.isfinite(r.dice.get(label, math.nan))])
        cell.count[label] = len(values)
        cell.mean[label] = float(values.mean()) if len(values) else math.nan
        cell.std[label] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return cell


def series_order(records: list[Record]) -> list[tuple[str, str, str]]:
    """The full grid kernel x loss (x variant) of the records, so a missing combination shows as missing.

    The paper's kernels and losses come first, in the paper's order, then the others alphabetically.
    """

    def rank(value: str, order: tuple[str, ...]) -> tuple[int, str]:
        return (order.index(value) if value in order else len(order), value)

    kernels = sorted({r.kernel for r in records}, key=lambda k: rank(k, KERNEL_ORDER))
    losses = sorted({r.loss for r in records}, key=lambda k: rank(k, LOSS_ORDER))
    variants = sorted({r.variant for r in records})
    return [(k, loss, v) for k in kernels for loss in losses for v in variants]


def learning_rates(records: list[Record]) -> list[float]:
    """The distinct learning rates of the records (merged within LR_REL_TOL), ascending."""
    found: list[float] = []
    for lr in sorted(r.lr for r in records):
        if not found or not math.isclose(lr, found[-1], rel_tol=LR_REL_TOL):
            found.append(lr)
    return found


def _at(records: list[Record], series: tuple, lr: float) -> list[Record]:
    return [r for r in records if r.series == series and math.isclose(r.lr, lr, rel_tol=LR_REL_TOL)]


def cells(records: list[Record], labels: list[str], lr: float) -> dict[tuple, Cell]:
    """{series: Cell} at learning rate `lr` (relative tolerance LR_REL_TOL); series without runs there too."""
    return {series: aggregate(_at(records, series, lr), labels) for series in series_order(records)}


def parameter_counts(records: list[Record]) -> dict[tuple, int | None]:
    """{series: model.num_parameters}: the most common value over the series' runs at any lr.

    The count does not depend on the loss, so a series without runs takes it from the same kernel (and
    variant) trained with another loss.
    """
    known = [r for r in records if r.num_parameters is not None]
    counts: dict[tuple, int | None] = {}
    for series in series_order(records):
        values = [r.num_parameters for r in known if r.series == series]
        values = values or [
            r.num_parameters for r in known if (r.kernel, r.variant) == (series[0], series[2])
        ]
        counts[series] = max(set(values), key=values.count) if values else None
    return counts


def _fmt_pct(mean: float, std: float) -> str:
    """Dice fraction as 'mean±std' in percent with one decimal; MISSING when there is no value."""
    if not math.isfinite(mean):
        return MISSING
    return f"{100 * mean:.1f}±{100 * std:.1f}" if math.isfinite(std) else f"{100 * mean:.1f}"


def _fmt_num(value: float) -> str:
    return f"{value:.12g}" if math.isfinite(value) else ""


def _runs_text(cell: Cell) -> str:
    counted = cell.count.get(AVERAGE, 0)
    text = f"{counted}/{cell.runs}" if counted != cell.runs else f"{cell.runs}"
    return text + (f" ({cell.diverged} diverged)" if cell.diverged else "")


def write_table_csv(path: Path, table: dict[tuple, Cell], params: dict, labels: list[str], lr: float) -> Path:
    """Table 1 as CSV: one row per series, `<label>_mean` / `<label>_std` columns (fractions)."""
    variant = any(series[2] for series in table)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        head = ["kernel", "loss", *(["variant"] if variant else []), "lr", "parameters", "runs", "diverged"]
        writer.writerow(
            [*head, "splits", *(f"{label}_{s}" for label in [*labels, AVERAGE] for s in ("mean", "std"))]
        )
        for series, cell in table.items():
            row = [series[0], series[1], *([series[2]] if variant else []), f"{lr:g}"]
            row += [params[series] or "", cell.runs, cell.diverged, " ".join(cell.splits)]
            row += [
                _fmt_num(getattr(cell, s)[label]) for label in [*labels, AVERAGE] for s in ("mean", "std")
            ]
            writer.writerow(row)
    return path


def write_table_markdown(
    path: Path, table: dict[tuple, Cell], params: dict, labels: list[str], lr: float, source: str
) -> Path:
    """Table 1 as Markdown: test Dice in percent, mean±std over splits, MISSING for cells without runs."""
    variant = any(series[2] for series in table)
    head = ["kernel", "loss", *(["variant"] if variant else []), "parameters", "runs", *labels, AVERAGE]
    lines = [
        f"# Test Dice (%) at learning rate {lr:g}: mean±std over splits",
        "",
        f"Source: {source}. Only FINISHED runs count; std is the sample std (ddof=1) over splits; "
        f"'{MISSING}' = no run with that metric. 'runs' = runs with test metrics / runs (diverged runs).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * (len(head) - len(labels) - 1) + ["---:"] * (len(labels) + 1)) + "|",
    ]
    for series, cell in table.items():
        n_params = f"{params[series]:,}" if params[series] is not None else MISSING
        row = [series[0], series[1], *([series[2]] if variant else []), n_params, _runs_text(cell)]
        row += [_fmt_pct(cell.mean[label], cell.std[label]) for label in [*labels, AVERAGE]]
        lines.append("| " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_runs_csv(path: Path, records: list[Record], labels: list[str]) -> Path:
    """Every counted run with its coordinates and test Dice values: what the table and figure are made of."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["run_id", "kernel", "loss", "variant", "lr", "split", "diverged", "parameters", *labels, AVERAGE]
        )
        for r in sorted(records, key=lambda r: (r.series, r.lr, r.split)):
            row = [r.run_id, r.kernel, r.loss, r.variant, f"{r.lr:g}", r.split, str(r.diverged).lower()]
            row += [r.num_parameters or ""] + [
                _fmt_num(r.dice.get(label, math.nan)) for label in [*labels, AVERAGE]
            ]
            writer.writerow(row)
    return path


def figure_data(records: list[Record]) -> dict[str, dict[str, list[tuple]]]:
    """{kernel: {loss [variant]: [(lr, mean, std, n_diverged), ...]}} of test/dice_mean for Fig. 3."""
    panels: dict[str, dict[str, list[tuple]]] = {}
    for series in series_order(records):
        line = []
        for lr in learning_rates(records):
            cell = aggregate(_at(records, series, lr), [])
            if cell.runs:
                line.append((lr, cell.mean[AVERAGE], cell.std[AVERAGE], cell.diverged))
        if line:
            panels.setdefault(series[0], {})[f"{series[1]} {series[2]}".strip()] = line
    return panels


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
    from medexp import plots

    selection = select_runs(uri, experiment, sweep)
    labels = label_names(selection.runs)
    records = to_records(selection.runs, labels)
    if not records:
        statuses = sorted({r["status"] for r in selection.runs if "kernel" in r["tags"]})
        found = f" (training runs found: {', '.join(statuses)})" if statuses else ""
        raise ReportError(f"no FINISHED training runs in {selection.source}{found}")
    out = Path(out_dir) if out_dir else Path("outputs") / "reports" / selection.name
    out.mkdir(parents=True, exist_ok=True)
    table = cells(records, labels, lr)
    params = parameter_counts(records)
    stem = f"table1_lr{lr:g}"
    files = [
        plots.dice_vs_lr(figure_data(records), out / "fig3_dice_vs_lr.png", title=selection.source),
        write_table_markdown(out / f"{stem}.md", table, params, labels, lr, selection.source),
        write_table_csv(out / f"{stem}.csv", table, params, labels, lr),
        write_runs_csv(out / "runs.csv", records, labels),
    ]
    parent = selection.parent_run_id
    if parent is None and len({r.parent_run_id for r in records}) == 1:
        parent = records[0].parent_run_id
    if log and parent:
        tracking.log_artifacts(uri, parent, files, "report")
    at_lr = sum(cell.runs for cell in table.values())
    rates, logged = learning_rates(records), parent if log else None
    return Report(files, selection.source, len(records), rates, logged, files[1].read_text(), lr, at_lr)
