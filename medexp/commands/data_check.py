"""`medexp data check [overrides]`: read every case of the composed dataset and print one table of every
case and all its problems; exit 0 only when every case is usable."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from medexp.config.build import build_dataset
from medexp.config.compose import compose_config
from medexp.config.validate import validate
from medexp.data.records import CaseReport, fmt_values


def render(reports: list[CaseReport], title: str):
    """A rich Table: case, files, shape, spacing, label values found, problems (one row per case)."""
    table = Table(title=title, show_lines=False)
    for column in ("case", "shape", "spacing (mm)", "label values", "problems"):
        table.add_column(column, overflow="fold")
    for r in reports:
        shape = (f"{r.channels}ch " if r.channels > 1 else "") + fmt_values(r.shape)
        problems = "\n".join(r.problems) if r.problems else "[green]ok[/green]"
        table.add_row(r.id, shape, fmt_values(r.spacing, 2), fmt_values(r.values, sep=", "), problems)
    return table


def run_check(overrides: list[str]) -> int:
    """`medexp data check [overrides]`: read every case of the composed dataset, print one table.

    Args:
        overrides: Hydra overrides as for `medexp train` (e.g. ["dataset=nifti", "dataset.root=/data"]).

    Returns:
        0 if every case is usable, else 1.

    Raises:
        ConfigError, DataError: user errors that stop the check itself (bad key, missing folder, no cases).
    """
    cfg = compose_config(list(overrides))
    validate(cfg)
    reports, where = build_dataset(cfg).inspect()
    bad = [r for r in reports if r.problems]
    console = Console(width=max(Console().width, 120))
    console.print(render(reports, f"{len(reports)} case(s) in {where}"))
    if bad:
        n_problems = sum(len(r.problems) for r in bad)
        console.print(f"[red]{n_problems} problem(s) in {len(bad)} of {len(reports)} row(s)[/red]")
        return 1
    console.print(f"[green]all {len(reports)} case(s) usable[/green]")
    return 0
