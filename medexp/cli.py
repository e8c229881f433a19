"""The `medexp` command: a typer app. Wiring only; the work lives in medexp.run (train), medexp.report and
medexp.commands (params, evaluate, predict, data check, ui).

`medexp train ...` hands its arguments verbatim to a @hydra.main function (sys.argv is rewritten from
the typer context and restored afterwards), so -m, --cfg job, --info, --help, launchers and sweepers all
behave as in any Hydra app. Overrides are checked first (medexp.config.compose) so that user errors end with
one line and exit code 2, before any model is built or MLflow run is created.
"""

from __future__ import annotations

import os
import sys

import typer

from medexp.errors import USER_ERRORS

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Experiment runner for medical image segmentation."
)


def _print_version(value: bool) -> None:
    if value:
        from medexp import __version__

        print(f"medexp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
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
    from medexp.config.compose import check

    args = list(ctx.args)
    try:  # before torch, MONAI and MLflow are imported: a user error (or a store's fault) is quick
        jobs = check(args, lambda uris: _check_stores("train", uris, create=True, write=True))
    except USER_ERRORS as err:
        fail("train", err)
    if _prints_only(args):  # --cfg, --info, --help: Hydra prints and never calls the job (nor callbacks)
        _hydra_main(_no_job, args)
        return
    from medexp.run.job import hydra_job  # torch, MONAI, MLflow: only for a run
    from medexp.tracking.sweep import SweepParentRun

    os.environ["MEDEXP_SWEEP_SIZE"] = str(jobs)  # for "job i/N" in every job's progress line
    try:
        _hydra_main(hydra_job, args)
    except KeyboardInterrupt:
        SweepParentRun.abandon("KILLED")  # the running job's own run is already KILLED (train.py)
        raise
    except BaseException:  # e.g. Hydra's SystemExit(1) when a job's config cannot be composed mid-sweep
        SweepParentRun.abandon("FAILED")
        raise
    if SweepParentRun.failures:
        raise typer.Exit(1)


def _hydra_main(task, args: list[str]) -> None:
    """Run `task` as a @hydra.main app over conf/train.yaml with `args` as its command line."""
    import hydra

    from medexp.config.registry import CONF_DIR

    main = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)(task)
    saved = sys.argv
    sys.argv = ["medexp train", *args]
    try:
        main()
    finally:
        sys.argv = saved


PRINT_FLAGS = ("--cfg", "-c", "--info", "-i")


def _prints_only(args: list[str]) -> bool:
    """Whether Hydra only prints for these arguments (a config, its info or its help) and runs no job."""
    from medexp.config.compose import split_args

    return split_args(args)[2] or any(a.split("=")[0] in PRINT_FLAGS for a in args)


def _no_job(cfg) -> None:
    """The task function for `--cfg`/`--info`/`--help`, which Hydra never calls: importing the real one
    (medexp.run.job) would load torch, MONAI and MLflow for a printout."""
    raise AssertionError("Hydra runs no job for --cfg, --info or --help")


_no_job.__module__ = "medexp.run.job"  # Hydra names the job after the module: `job`, as for a run


def _check_stores(command: str, uris, create: bool, write: bool) -> list[str]:
    """The resolved stores of `uris` (None: $MLFLOW_TRACKING_URI, else the default), each checked up front
    (medexp.tracking.store.check_store); a fault ends the command with one line."""
    from medexp.tracking.store import check_store, resolve_uri

    try:
        resolved = [resolve_uri(u, create=False) for u in uris]  # checking creates nothing, not even outputs/
        for uri in resolved:
            check_store(uri, create=create, write=write)
    except USER_ERRORS as err:
        fail(command, err)
    return resolved


def _fail_naming_the_store(command: str, err: Exception) -> None:
    """`fail`, with where to point at another store added to a message that names the store searched."""
    from medexp.tracking.store import ELSEWHERE

    text = str(err)
    if "store" in text and "--tracking-uri" not in text:  # e.g. "run X: not found in the MLflow store Y"
        text = f"{text}; {ELSEWHERE}"
    fail(command, type(err)(text))


def main() -> None:
    """Console-script entry point."""
    from medexp.run import runtime

    runtime.configure()  # before anything imports torch
    if not sys.stderr.isatty():  # a log or a pipe: no ANSI colour codes (Optuna's colorlog reads NO_COLOR)
        os.environ.setdefault("NO_COLOR", "1")
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
    from medexp.commands.params import print_params

    try:
        print_params(list(ctx.args), num_classes, in_channels, from_dataset)
    except USER_ERRORS as err:
        fail("params", err)


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
        None,
        "--output",
        "-o",
        help="Output folder (default: reports/<name> next to a sqlite store).",
    ),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: as medexp train)."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log the files to the sweep's parent run."),
) -> None:
    """Fig. 3 (test Dice vs learning rate) and Table 1 (per-label Dice at one lr) from the MLflow runs."""
    (uri,) = _check_stores("report", [tracking_uri], create=False, write=log)  # never creates a store
    from medexp.report.make import make_report
    from medexp.tracking.liveness import mark_dead_runs

    if log:  # --no-log writes nothing to the store
        mark_dead_runs(uri)  # runs whose process died are KILLED, not live (§9)
    try:
        result = make_report(
            uri,
            experiment=experiment,
            sweep=sweep,
            lr=lr,
            out_dir=output,
            log=log,
        )
    except USER_ERRORS as err:
        _fail_naming_the_store("report", err)
    print(result.summary())


@app.command()
def ui(
    port: int = typer.Option(5000, "--port", "-p", help="Port to serve on."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes it to the network)."
    ),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: as medexp train)."),
    allowed_hosts: str = typer.Option(
        None,
        "--allowed-hosts",
        help="Host headers to answer (MLflow's --allowed-hosts; default beyond loopback: this machine's "
        "names and addresses, localhost and private IPs).",
    ),
) -> None:
    """MLflow UI over the project's store; Ctrl-C stops the server and every process it started."""
    (uri,) = _check_stores("ui", [tracking_uri], create=False, write=True)  # never creates a store
    from medexp.commands.ui import serve

    raise typer.Exit(serve(uri, host=host, port=port, allowed_hosts=allowed_hosts))


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

    (uri,) = _check_stores("evaluate", [tracking_uri], create=False, write=True)  # never creates a store
    from medexp.commands.evaluate import evaluate_run

    try:
        metrics = evaluate_run(run_id, split, uri)
    except USER_ERRORS as err:
        _fail_naming_the_store("evaluate", err)
    table = Table(title=f"run {run_id}: {split}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets: medexp data check \\[overrides].")
app.add_typer(data_app, name="data")


@data_app.command("check", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def data_check(ctx: typer.Context) -> None:
    """Read every case of the dataset (overrides as for train); one table; exit 1 if any case is unusable."""
    from medexp.commands.data_check import run_check

    try:
        code = run_check(list(ctx.args))
    except USER_ERRORS as err:
        fail("data check", err)
    raise typer.Exit(code)


@app.command()
def predict(
    model: str = typer.Argument(
        ..., help="runs:/RUN_ID/model, models:/NAME/VERSION, a run id, or a run's folder or checkpoint."
    ),
    inputs: list[str] = typer.Option(
        ..., "--input", "-i", help="Image file or folder (repeatable); per-channel files are grouped by case."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Folder for the label maps (<case><ending>)."),
    probabilities: bool = typer.Option(
        False, "--probabilities", help="Also write <name>_probabilities.nii.gz."
    ),
    tracking_uri: str = typer.Option(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI or the project's)."
    ),
) -> None:
    """Segment images with a trained model; label maps in the dataset's values, on the inputs' grids."""
    if not os.path.exists(model) or tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        (tracking_uri,) = _check_stores("predict", [tracking_uri], create=False, write=False)
    from medexp.commands.predict import predict as run_predict

    try:
        written = run_predict(model, inputs, output, probabilities, tracking_uri)
    except USER_ERRORS as err:
        _fail_naming_the_store("predict", err)
    print(f"wrote {len(written)} label map(s) to {output}")
