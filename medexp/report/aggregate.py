"""Statistics over splits: per (kernel, loss, variant) series and learning rate, the mean and sample std of
each label's test Dice."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medexp.report.select import AVERAGE, Record

KERNEL_ORDER = ("conventional", "gabor", "mixed")
LOSS_ORDER = ("pcc", "dice", "ce")
LR_REL_TOL = 0.01  # --lr 3.16e-4 matches 10**-3.5


@dataclass
class Cell:
    """Aggregate of the runs of one (series, lr): per-label mean and std over splits."""

    runs: int = 0
    diverged: int = 0
    splits: list[str] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)


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


def figure_data(records: list[Record]) -> dict[str, dict[str, list[tuple]]]:
    """{kernel: {loss [variant]: [(lr, mean, std, n_diverged, n_values), ...]}} of test/dice_mean for
    Fig. 3; n_values counts the runs with a test Dice (mean and std are over those splits)."""
    panels: dict[str, dict[str, list[tuple]]] = {}
    for series in series_order(records):
        line = []
        for lr in learning_rates(records):
            cell = aggregate(_at(records, series, lr), [])
            if cell.runs:
                line.append((lr, cell.mean[AVERAGE], cell.std[AVERAGE], cell.diverged, cell.count[AVERAGE]))
        if line:
            panels.setdefault(series[0], {})[f"{series[1]} {series[2]}".strip()] = line
    return panels
