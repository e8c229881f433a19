"""`medexp report` and docs/results.md against a real 16-run sweep: every number re-derived from MLflow here.

One multirun, a tiny version of the CPU study (experiment=study_cpu: 2 kernels x 2 losses x 2 learning
rates x 2 splits, 1 epoch on 16^3 brain-like volumes with the 19 labels of Table 1a), feeds all report
tests and the results page of scripts/study_results.py; the partial-sweep test works on a copy of its
store. The per-run plots of medexp.report.run_plots are tested on tiny inputs at the end.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_medexp, store_uri
from mlflow.tracking import MlflowClient

SWEEP = [
    "train",
    "-m",
    "experiment=study_cpu",
    "kernel=conventional,mixed",
    "loss=pcc,dice",
    "lr=1e-3,1e-2",
    "split=0,1",
    "dataset.shape=[16,16,16]",
    "dataset.num_cases=8",
    "trainer.max_epochs=1",
    "kernel.gabor_size=3",  # 3^3 instead of 7^3 Gabor kernels: same parameter count, far less CPU
    "experiment_name=rep",
]
LABELS = [  # Wong & Moradi Table 1a, in its order
    "cerebral_grey", "3rd_ventricle", "4th_ventricle", "brainstem", "cvl_1_5", "cvl_6_7", "cvl_8_10",
    "accumbens", "amygdala", "caudate", "cerebellar_grey", "cerebellar_white", "cerebral_white",
    "hippocampus", "inf_lateral_vent", "lateral_ventricle", "pallidum", "putamen", "thalamus",
]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


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
    values = np.array(  # a NaN (the label was absent from every test case of a run) counts as no value
        [r.data.metrics[key] for r in runs if r.info.status == "FINISHED" and key in r.data.metrics]
    )
    values = values[np.isfinite(values)]
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


@pytest.mark.e2e
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
    names = ("fig3_dice_vs_lr.png", "fig3_dice_vs_lr.md", "fig3_dice_vs_lr.csv", "runs.csv")
    assert logged == {f"report/{n}" for n in (*names, "table1_lr0.001.md", "table1_lr0.001.csv")}
    assert f"logged to MLflow run {parent_id}" in result.stdout


@pytest.mark.e2e
def test_report_other_lr_and_figure_points(sweep: Path):
    from medexp.report import aggregate, make, select

    uri = store_uri(sweep)
    runs = child_runs(MlflowClient(uri))
    done = make.make_report(uri, experiment="rep", lr=1e-2, out_dir=sweep / "lr1e-2", log=False)
    check_table(read_csv(sweep / "lr1e-2" / "table1_lr0.01.csv"), runs, 1e-2)
    selection = select.select_runs(uri, "rep")
    labels = select.label_names(selection.runs)
    panels = aggregate.figure_data(select.to_records(selection.runs, labels))
    assert done.learning_rates == [1e-3, 1e-2] and set(panels) == {"conventional", "mixed"}
    for kernel, lines in panels.items():
        for loss, points in lines.items():
            for lr, mean, std, _, n in points:
                cell = [
                    r
                    for r in runs
                    if (r.data.tags["kernel"], r.data.tags["loss"], float(r.data.params["lr"]))
                    == (kernel, loss, lr)
                ]
                assert np.allclose((mean, std), expected_cell(cell, "average"), rtol=1e-9)
                assert n == len(cell) == 2


@pytest.mark.e2e
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


def percent_cells(markdown: str, first: str, columns: list[str]) -> dict[tuple[str, str], list[tuple]]:
    """{(kernel, loss): [(column, mean, std) in %, ...]} of `columns` in the table whose header row starts
    with `first`; a cell without ± has std NaN, a missing one ('–') both NaN."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first}"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    out = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True))
        values = []
        for name in columns:
            match = re.fullmatch(r"(-?[\d.]+)(?:±([\d.]+))?", cells[name])
            mean, std = (float(match[1]), float(match[2] or "nan")) if match else (math.nan, math.nan)
            values.append((name, mean, std))
        out[cells["kernel"], cells["loss"]] = values
    return out


@pytest.mark.e2e
def test_study_results_exports_the_stores_runs_and_rebuilds_the_page_from_them(sweep: Path, tmp_path: Path):
    """scripts/study_results.py on the tiny sweep: runs.csv holds every run with the store's test Dice and
    its validation curve, and the page is rebuilt from runs.csv alone (no store given to `page`)."""
    client = MlflowClient(store_uri(sweep))
    runs = {r.info.run_id: r for r in child_runs(client)}
    script = [sys.executable, str(ROOT / "scripts" / "study_results.py")]
    table = tmp_path / "runs.csv"
    done = subprocess.run(
        [*script, "export", "--tracking-uri", store_uri(sweep), "--experiment", "rep", "--out", str(table)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with table.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} == set(runs)
    for row in rows:
        run = runs[row["run_id"]]
        assert float(row["test_dice"]) == pytest.approx(run.data.metrics["test/dice_mean"], rel=1e-6)
        curve = [m.value for m in client.get_metric_history(row["run_id"], "val/dice_mean")]
        assert [float(v) for v in row["val_curve"].split(";")] == pytest.approx(curve, rel=1e-5)
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n## Pre-registration\n\n(kept)\n\n## Exploratory grid\n\n(kept)\n")
    done = subprocess.run(
        [*script, "page", "--runs", str(table), "--out", str(page)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("# Results: Claim A not tested; Claim B not tested")  # no study_claims cells here
    assert text.count("(kept)") == 2 and "**Claim A**: **not tested**" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "nope"], "medexp report: error: unknown experiment 'nope'"),
        (["--sweep", "0123456789abcdef"], "medexp report: error: unknown sweep '0123456789abcdef'"),
    ],
)
@pytest.mark.e2e
def test_report_user_errors_are_one_line(sweep: Path, args: list[str], message: str):
    result = run_medexp(["report", *args, "-o", "unused"], cwd=sweep)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.e2e
def test_report_without_runs_is_a_user_error(tmp_path: Path):
    result = run_medexp(["report", "-o", "unused"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("medexp report: error: no MLflow store at ")
    assert not (tmp_path / "outputs" / "mlflow.db").exists(), "reading must not create a store"


# --- per-run plots (medexp.report.run_plots) on tiny inputs


def _is_png_with_content(path: Path) -> bool:
    from matplotlib.image import imread

    image = imread(path)
    return path.suffix == ".png" and image.ndim == 3 and float(image[..., :3].std()) > 0.01


def test_per_run_plots(tmp_path: Path):
    from medexp.data.demo import DemoDataset
    from medexp.nn.gabor import GaborConv2d, GaborConv3d
    from medexp.report import run_plots as plots

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
