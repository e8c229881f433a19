"""Table 1 analogue as Markdown (percent, like the paper) and CSV (fractions), and the runs behind it."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from medexp.report.aggregate import Cell
from medexp.report.select import AVERAGE, Record

MISSING = "–"


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


def lr_label(lr: float) -> str:
    """A learning rate as the paper writes it: 1e-4, 1e-3.5, ... for (half) decades, else %g."""
    exponent = math.log10(lr)
    if abs(2 * exponent - round(2 * exponent)) > 1e-3:
        return f"{lr:g}"
    half = round(2 * exponent) / 2
    return f"1e{half:g}"


def write_figure_tables(md_path: Path, csv_path: Path, panels: dict, rates: list[float], source: str):
    """The numbers behind Fig. 3: mean test Dice (foreground average) ± std over splits per kernel, loss
    and learning rate, as Markdown (percent) and CSV (fractions). Returns the two paths.

    Args:
        panels: medexp.report.aggregate.figure_data: {kernel: {loss: [(lr, mean, std, diverged, n)]}}.
    """
    points = [p for lines in panels.values() for line in lines.values() for p in line]
    usual = max((p[4] for p in points), default=0)
    lines = [
        "# Test Dice (%, mean over labels) against learning rate: mean±std over splits",
        "",
        f"Source: {source}. Cells: mean±std over {usual} split(s); (n=k): only k splits have a test Dice; "
        f"†k: k runs diverged; {MISSING}: no run.",
        "",
        "| " + " | ".join(["kernel", "loss", *(lr_label(lr) for lr in rates)]) + " |",
        "|---|---|" + "---:|" * len(rates),
    ]
    rows = []
    for kernel, by_loss in panels.items():
        for loss, line in by_loss.items():
            at = {f"{p[0]:.6g}": p for p in line}
            texts = []
            for lr in rates:
                point = at.get(f"{lr:.6g}")
                if point is None:
                    texts.append(MISSING)
                    continue
                _, mean, std, diverged, counted = point
                text = _fmt_pct(mean, std) + (f" (n={counted})" if counted != usual else "")
                texts.append(text + (f" †{diverged}" if diverged else ""))
                rows.append([kernel, loss, f"{lr:g}", _fmt_num(mean), _fmt_num(std), counted, diverged])
            lines.append("| " + " | ".join([kernel, loss, *texts]) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kernel", "loss", "lr", "dice_mean", "dice_std", "splits", "diverged"])
        writer.writerows(rows)
    return md_path, csv_path
