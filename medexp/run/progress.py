"""Console output of a training job: a rich progress bar with ETA (live on a terminal), one line per epoch
in logs, and the closing summary table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class TrainProgress:
    """Epoch and batch bars; silent when `enabled` is False (ranks other than 0)."""

    def __init__(self, enabled: bool, max_epochs: int, steps_per_epoch: int, title: str = "train") -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.max_epochs = max_epochs
        self.prefix = "" if title == "train" else f"{title} "  # "job 3/225 " in a sweep
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self.epochs = self.progress.add_task(title, total=max_epochs, info="")
        self.batches = self.progress.add_task("epoch", total=steps_per_epoch, info="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int) -> None:
        self.progress.reset(self.batches, description=f"epoch {epoch}")

    def step(self, loss: float) -> None:
        self.progress.update(self.batches, advance=1, info=f"loss {loss:.4f}")

    def end_epoch(self, epoch: int, metrics: dict[str, float], best: bool) -> None:
        info = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.progress.update(self.epochs, completed=epoch, info=info)
        if self.enabled and not self.live:
            self.console.print(
                f"{self.prefix}epoch {epoch}/{self.max_epochs} {info}{' (best)' if best else ''}",
                highlight=False,
            )

    def skip_to(self, epoch: int) -> None:
        self.progress.update(self.epochs, completed=epoch)


def print_summary(rows: list[tuple[str, str]], title: str = "medexp train") -> None:
    """The closing summary of a job on stdout: one line per job in a multirun (the sweep prints one table
    at its end, medexp.tracking.sweep); plain `what: value` lines when stdout is no terminal (a rich table
    is cut to 80 columns there, which cut the output folder's path); else a two-column table."""
    job = _sweep_job()
    if job is not None:
        shown = ", ".join(f"{key} {value}" for key, value in rows if key != "tracking uri")
        print(f"{job}: {shown}", flush=True)
        return
    console = Console()
    if not console.is_terminal:
        print("\n".join([title, *(f"  {key}: {value}" for key, value in rows)]), flush=True)
        return
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _sweep_job() -> str | None:
    """ "job i/N" when this process runs a job of a multirun, else None."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"job {HydraConfig.get().job.num + 1}/{os.environ.get('MEDEXP_SWEEP_SIZE', '?')}"
