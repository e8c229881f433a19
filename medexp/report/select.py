"""Which MLflow runs a report is made of: a sweep's, an experiment's or the latest sweep's training runs,
reduced to Records (the latest FINISHED run per kernel, loss, variant, lr and split)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medexp.errors import ReportError
from medexp.evaluation.summary import COUNT_SUFFIX
from medexp.tracking import queries

VARIANT_TAGS = ("head", "model", "dataset")
AVERAGE = "average"


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
    experiments = queries.list_experiments(uri)
    names = {v: k for k, v in experiments.items()}
    if experiment is not None and experiment not in experiments:
        known = ", ".join(sorted(experiments)) or "none"
        raise ReportError(f"unknown experiment {experiment!r} in {uri} (known: {known})")
    if sweep is None and experiment is not None:
        runs = queries.search_runs(uri, [experiments[experiment]])
        return Selection(runs, f"experiment {experiment}", experiment)
    if sweep is None:
        sweep = _latest_sweep(uri, list(experiments.values()))
    parent = queries.get_run(uri, sweep)
    if parent is None:
        raise ReportError(f"unknown sweep {sweep!r}: no run with that id in {uri}")
    exp_name = names.get(parent["experiment_id"], parent["experiment_id"])
    if experiment is not None and exp_name != experiment:
        raise ReportError(f"sweep {sweep} belongs to experiment {exp_name!r}, not {experiment!r}")
    runs = queries.search_runs(uri, [parent["experiment_id"]], f"tags.sweep_id = '{sweep}'")
    runs = [r for r in runs if r["run_id"] != sweep]
    return Selection(runs, f"sweep {sweep} (experiment {exp_name})", f"sweep-{sweep[:8]}", sweep)


def _latest_sweep(uri: str, experiment_ids: list[str]) -> str:
    """Id of the most recently started sweep parent run in the store."""
    parents = [
        r for r in queries.search_runs(uri, experiment_ids) if r["tags"].get("sweep_id") == r["run_id"]
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
        metrics = run["metrics"]
        for key in sorted(metrics):
            name = key[len("test/dice/") :]
            if not key.startswith("test/dice/") or name in order:
                continue
            if name.endswith(COUNT_SUFFIX) and f"test/dice/{name[: -len(COUNT_SUFFIX)]}" in metrics:
                continue  # test/dice/<label>_n: how many cases the label's mean covers, not a label
            order.append(name)
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
