"""`medexp report` against a real 16-run sweep: every number of Table 1 re-derived from MLflow here.

One multirun (2 kernels x 2 losses x 2 learning rates x 2 splits, 1 epoch on 16^3 demo volumes) feeds
all report tests; the partial-sweep test works on a copy of its store. The per-run plots of
medexp.plots are tested on tiny inputs at the end.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

SWEEP = [
    "train",
    "-m",
    "kernel=conventional,mixed",
    "loss=pcc,dice",
    "lr=1e-3,1e-2",
    "split=0,1",
    *TINY,
    "trainer.max_epochs=1",
    "kernel.gabor_size=3",  # 3^3 instead of 7^3 Gabor kernels: same parameter count, far less CPU
    "eval.metrics=[dice]",
    "tracking.log_checkpoint=false",
    "experiment_name=rep",
]
LABELS = ["large1", "large2", "medium3", "small4", "tiny5"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Folder whose outputs/mlflow.db holds the finished 16-run sweep of experiment `rep`."""
    cwd = tmp_path_factory.mktemp("report")
    result = run_medexp(SWEEP, cwd=cwd, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def child_runs(client: MlflowClient, experiment: str = "rep") -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def expected_cell(runs: list, label: str) -> tuple[float, float]:
    """(mean, sample std) over the FINISHED runs' test Dice of `label` ('average' = test/dice_mean)."""
    key = "test/dice_mean" if label == "average" else f"test/dice/{label}"
    values = np.array(
        [r.data.metrics[key] for r in runs if r.info.status == "FINISHED" and key in r.data.metrics]
    )
    if len(values) == 0:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def check_table(rows: list[dict], runs: list, lr: float) -> None:
    """Every number of the CSV table against the aggregation of the MLflow runs done here."""
    assert {(r["kernel"], r["loss"]) for r in rows} == {
        (k, s) for k in ("conventional", "mixed") for s in ("pcc", "dice")
    }
    assert [r["kernel"] for r in rows] == ["conventional"] * 2 + ["mixed"] * 2, "paper order"
    numeric = [c for c in rows[0] if c.endswith(("_mean", "_std"))]
    assert numeric == [f"{label}_{s}" for label in [*LABELS, "average"] for s in ("mean", "std")]
    for row in rows:
        cell = [
            r
            for r in runs
            if (r.data.tags["kernel"], r.data.tags["loss"]) == (row["kernel"], row["loss"])
            and math.isclose(float(r.data.params["lr"]), lr)
        ]
        finished = [r for r in cell if r.info.status == "FINISHED"]
        assert int(row["runs"]) == len(finished)
        assert row["splits"].split() == sorted(r.data.tags["split"] for r in finished)
        assert row["parameters"] == cell[0].data.params["model.num_parameters"]
        assert int(row["diverged"]) == sum(r.data.tags.get("diverged") == "true" for r in finished)
        for label in [*LABELS, "average"]:
            mean, std = expected_cell(cell, label)
            for column, want in ((f"{label}_mean", mean), (f"{label}_std", std)):
                got = float(row[column]) if row[column] else math.nan
                assert (math.isnan(got) and math.isnan(want)) or math.isclose(
                    got, want, rel_tol=1e-9, abs_tol=1e-12
                ), (
                    row["kernel"],
                    row["loss"],
                    column,
                    got,
                    want,
                )


def test_report_table_matches_mlflow_runs(sweep: Path):
    out = sweep / "report-out"
    result = run_medexp(["report", "--experiment", "rep", "-o", str(out)], cwd=sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store_uri(sweep))
    runs = child_runs(client)
    assert len(runs) == 16 and all(r.info.status == "FINISHED" for r in runs)
    check_table(read_csv(out / "table1_lr0.001.csv"), runs, 1e-3)
    # Markdown: the same cells in percent, one decimal; the parameter counts with thousands separators
    md = (out / "table1_lr0.001.md").read_text()
    row = read_csv(out / "table1_lr0.001.csv")[0]
    mean, std = 100 * float(row["average_mean"]), 100 * float(row["average_std"])
    assert f"| conventional | pcc | {int(row['parameters']):,} | 2 |" in md
    assert md.splitlines()[-4].endswith(f"| {mean:.1f}±{std:.1f} |")
    # Fig. 3: a real PNG; the table, figure and runs list are logged to the sweep's parent run
    assert (out / "fig3_dice_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert logged == {
        f"report/{n}" for n in ("fig3_dice_vs_lr.png", "table1_lr0.001.md", "table1_lr0.001.csv", "runs.csv")
    }
    assert f"logged to MLflow run {parent_id}" in result.stdout


def test_report_other_lr_and_figure_points(sweep: Path):
    from medexp import report

    uri = store_uri(sweep)
    runs = child_runs(MlflowClient(uri))
    done = report.make_report(uri, experiment="rep", lr=1e-2, out_dir=sweep / "lr1e-2", log=False)
    check_table(read_csv(sweep / "lr1e-2" / "table1_lr0.01.csv"), runs, 1e-2)
    selection = report.select_runs(uri, "rep")
    labels = report.label_names(selection.runs)
    panels = report.figure_data(report.to_records(selection.runs, labels))
    assert done.learning_rates == [1e-3, 1e-2] and set(panels) == {"conventional", "mixed"}
    for kernel, lines in panels.items():
        for loss, points in lines.items():
            for lr, mean, std, _ in points:
                cell = [
                    r
                    for r in runs
                    if (r.data.tags["kernel"], r.data.tags["loss"], float(r.data.params["lr"]))
                    == (kernel, loss, lr)
                ]
                assert np.allclose((mean, std), expected_cell(cell, "average"), rtol=1e-9)


def test_partial_sweep_shows_missing_cells(sweep: Path, tmp_path: Path):
    """A copy of the store where one cell failed, one split was killed and one run diverged."""
    (tmp_path / "outputs").mkdir()
    shutil.copy(sweep / "outputs" / "mlflow.db", tmp_path / "outputs" / "mlflow.db")
    client = MlflowClient(store_uri(tmp_path))
    runs = child_runs(client)
    at = {
        (r.data.tags["kernel"], r.data.tags["loss"], r.data.tags["lr"], r.data.tags["split"]): r for r in runs
    }
    for split in "01":
        client.set_terminated(at["mixed", "dice", "0.001", split].info.run_id, "FAILED")
    client.set_terminated(at["conventional", "pcc", "0.001", "1"].info.run_id, "KILLED")
    client.set_tag(at["conventional", "dice", "0.001", "0"].info.run_id, "diverged", "true")
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    result = run_medexp(["report", "--sweep", parent_id, "-o", "partial"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "partial" / "table1_lr0.001.csv")
    check_table(rows, child_runs(client), 1e-3)
    by_cell = {(r["kernel"], r["loss"]): r for r in rows}
    assert by_cell["mixed", "dice"]["runs"] == "0" and by_cell["mixed", "dice"]["average_mean"] == ""
    assert by_cell["mixed", "dice"]["parameters"] == by_cell["mixed", "pcc"]["parameters"], (
        "count from the kernel"
    )
    assert (
        by_cell["conventional", "pcc"]["runs"] == "1" and by_cell["conventional", "pcc"]["average_std"] == ""
    )
    assert by_cell["conventional", "dice"]["diverged"] == "1"
    md = (tmp_path / "partial" / "table1_lr0.001.md").read_text()
    assert "| mixed | dice | " in md and md.count("| – |") >= 1 and "2 (1 diverged)" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "nope"], "medexp report: error: unknown experiment 'nope'"),
        (["--sweep", "0123456789abcdef"], "medexp report: error: unknown sweep '0123456789abcdef'"),
    ],
)
def test_report_user_errors_are_one_line(sweep: Path, args: list[str], message: str):
    result = run_medexp(["report", *args, "-o", "unused"], cwd=sweep)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_report_without_runs_is_a_user_error(tmp_path: Path):
    result = run_medexp(["report", "-o", "unused"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(
        "medexp report: error: no MLflow store at sqlite:///"
    )
    assert not (tmp_path / "outputs" / "mlflow.db").exists(), "reading must not create a store"


# --- per-run plots (medexp.plots) on tiny inputs


def _is_png_with_content(path: Path) -> bool:
    from matplotlib.image import imread

    image = imread(path)
    return path.suffix == ".png" and image.ndim == 3 and float(image[..., :3].std()) > 0.01


def test_per_run_plots(tmp_path: Path):
    from medexp import plots
    from medexp.data.demo import DemoDataset
    from medexp.nn.gabor import GaborConv2d, GaborConv3d

    curves = plots.learning_curves(
        {"train/loss": [(1, 0.5), (2, 0.4)], "val/dice_mean": [(1, 0.2)]}, tmp_path / "c.png"
    )
    assert _is_png_with_content(curves)
    dataset = DemoDataset(root=str(tmp_path / "data"), num_cases=2, shape=[16, 16, 16])
    model = torch.nn.Sequential(
        GaborConv3d(1, 4, kernel_size=5), torch.nn.Conv3d(4, dataset.info.num_classes, 1)
    )
    overlay = plots.overlays(model, dataset.prepare(), dataset.info, tmp_path / "o.png", torch.device("cpu"))
    assert _is_png_with_content(overlay)
    assert _is_png_with_content(plots.gabor_kernels(model, tmp_path / "g.png"))
    assert _is_png_with_content(plots.gabor_kernels(GaborConv2d(2, 3), tmp_path / "g2.png"))
    assert plots.gabor_kernels(torch.nn.Conv3d(1, 2, 3), tmp_path / "none.png") is None
