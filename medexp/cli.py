"""The `medexp` command: a typer app. Wiring only; the work lives in train.py, report.py, ...

`medexp train ...` hands its arguments verbatim to a @hydra.main function (sys.argv is rewritten from
the typer context and restored afterwards), so -m, --cfg job, --info, --help, launchers and sweepers all
behave as in any Hydra app. Overrides are checked first (medexp.overrides) so that user errors end with
one line and exit code 2, before any model is built or MLflow run is created.
"""

from __future__ import annotations

import os
import sys

import typer

from medexp.config import CONF_DIR, ConfigError
from medexp.data.base import DataError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Experiment runner for medical image segmentation."
)

USER_ERRORS = (ConfigError, DataError)


@app.callback()
def _root() -> None:
    """medexp: compose kernel, loss, head, model and dataset from Hydra configs; train, evaluate, report."""


def fail(command: str, err: Exception, code: int = 2) -> None:
    """Print a user error as one line and exit with `code` (no traceback)."""
    print(f"medexp {command}: error: {err}", file=sys.stderr)  # plain print: rich would wrap the line
    sys.exit(code)  # SystemExit, not typer.Exit: Hydra's job runner would report typer.Exit as a crash


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Train (Hydra overrides; -m for a multirun; --help for Hydra's help)."""
    import hydra

    from medexp import overrides
    from medexp.job import hydra_job
    from medexp.tracking import SweepParentRun

    args = list(ctx.args)
    try:
        jobs = overrides.check(args)
    except USER_ERRORS as err:
        fail("train", err)
    os.environ["MEDEXP_SWEEP_SIZE"] = str(jobs)  # for "job i/N" in every job's progress line
    main = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)(hydra_job)
    saved = sys.argv
    sys.argv = ["medexp train", *args]
    try:
        main()
    except KeyboardInterrupt:
        SweepParentRun.abandon("KILLED")  # the running job's own run is already KILLED (train.py)
        raise
    except BaseException:  # e.g. Hydra's SystemExit(1) when a job's config cannot be composed mid-sweep
        SweepParentRun.abandon("FAILED")
        raise
    finally:
        sys.argv = saved
    if SweepParentRun.failures:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    from medexp import runtime

    runtime.configure()  # before anything imports torch
    app()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def params(
    ctx: typer.Context,
    num_classes: int = typer.Option(
        20, help="Output classes incl. background (paper: 19 labels + background)."
    ),
    in_channels: int = typer.Option(1, help="Image channels (paper: 1, T1 MRI)."),
    from_dataset: bool = typer.Option(
        False, "--from-dataset", help="Take classes and channels from the dataset."
    ),
) -> None:
    """Parameter table of the composed model (overrides as for train); last line `parameters: N`."""
    from rich.console import Console
    from rich.table import Table

    from medexp import build, config, model_summary, overrides

    try:
        cfg = overrides.compose_config(list(ctx.args))
        config.validate(cfg)
        dims = cfg.dataset.get("spatial_dims", 3)
        if from_dataset:
            info = build.build_dataset(cfg).info
            num_classes, in_channels, dims = info.num_classes, info.in_channels, info.spatial_dims
        model = build.build_model(cfg, in_channels, num_classes, dims)
    except USER_ERRORS as err:
        fail("params", err)
    table = Table(title=f"{cfg.model._target_.rsplit('.', 1)[-1]}: kernel={cfg.kernel.kind}, {dims}D")
    for column in ("block", "kernel", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name, kind, n in model_summary.block_table(model):
        table.add_row(name, kind, f"{n:,}")
    Console().print(table)
    print(f"parameters: {model_summary.count(model)}")


@app.command()
def report(
    experiment: str = typer.Option(
        None, "--experiment", "-e", help="Experiment name (all its sweeps and runs)."
    ),
    sweep: str = typer.Option(
        None, "--sweep", "-s", help="Sweep id (the parent run id); default: the latest sweep."
    ),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of the table (relative tolerance 1%)."),
    output: str = typer.Option(
        None, "--output", "-o", help="Output folder (default: outputs/reports/<name>)."
    ),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: as medexp train)."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log the files to the sweep's parent run."),
) -> None:
    """Fig. 3 (test Dice vs learning rate) and Table 1 (per-label Dice at one lr) from the MLflow runs."""
    from medexp import report as reporting
    from medexp import tracking

    try:
        result = reporting.make_report(
            tracking.resolve_uri(tracking_uri),
            experiment=experiment,
            sweep=sweep,
            lr=lr,
            out_dir=output,
            log=log,
        )
    except reporting.ReportError as err:
        fail("report", err)
    print(result.summary())


@app.command()
def ui(
    port: int = typer.Option(5000, "--port", "-p", help="Port to serve on."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes it to the network)."
    ),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: as medexp train)."),
) -> None:
    """MLflow UI over the project's store; Ctrl-C stops the server and every process it started."""
    from medexp import tracking
    from medexp import ui as mlflow_ui

    raise typer.Exit(mlflow_ui.serve(tracking.resolve_uri(tracking_uri), host=host, port=port))


@app.command()
def evaluate(
    run_id: str = typer.Argument(..., help="MLflow run id of a medexp training run."),
    split: str = typer.Option("test", help="Cases to evaluate: test or val."),
    tracking_uri: str = typer.Option(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI, outputs/mlflow.db)."
    ),
) -> None:
    """Re-evaluate a run's best checkpoint (eval.metrics of its config) and log to the same run."""
    from rich.console import Console
    from rich.table import Table

    from medexp.reevaluate import evaluate_run

    try:
        metrics = evaluate_run(run_id, split, tracking_uri)
    except USER_ERRORS as err:
        fail("evaluate", err)
    table = Table(title=f"run {run_id}: {split}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets: medexp data check [overrides].")
app.add_typer(data_app, name="data")


@data_app.command("check", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def data_check(ctx: typer.Context) -> None:
    """Read every case of the dataset (overrides as for train); one table; exit 1 if any case is unusable."""
    from medexp.data.check import run_check

    try:
        code = run_check(list(ctx.args))
    except USER_ERRORS as err:
        fail("data check", err)
    raise typer.Exit(code)


@app.command()
def predict(
    run_id: str = typer.Argument(..., help="MLflow run id of a medexp training run."),
    inputs: list[str] = typer.Option(..., "--input", "-i", help="NIfTI file or folder (repeatable)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for the label maps (same file names)."),
    probabilities: bool = typer.Option(
        False, "--probabilities", help="Also write <name>_probabilities.nii.gz."
    ),
    tracking_uri: str = typer.Option(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI or the project's)."
    ),
) -> None:
    """Segment NIfTI volumes with a run's best checkpoint; outputs have the inputs' shape and affine."""
    from medexp.predict import predict as run_predict

    try:
        written = run_predict(run_id, inputs, output, probabilities, tracking_uri)
    except USER_ERRORS as err:
        fail("predict", err)
    print(f"wrote {len(written)} label map(s) to {output}")
