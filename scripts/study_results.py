"""The pre-registered claims study (conf/experiment/study_claims.yaml): its runs table and its page.

    python scripts/study_results.py export --tracking-uri URI      # MLflow store -> docs/results/runs.csv
    python scripts/study_results.py page                           # runs.csv -> docs/results.md

`export` reads every run of the experiment (one row each: the cell, status, test and floor Dice, every
label's test Dice and test-case size, the validation curve, best epoch, convergence, commit); `page`
rebuilds the generated part of docs/results.md from runs.csv alone, so anyone can regenerate or audit the
page without the store. The verdicts follow from medexp.report.claims (the pre-registered rules).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import tempfile
from pathlib import Path

from medexp.report.claims import (
    SPLITS,
    Verdict,
    best_epoch,
    claim_a,
    claim_b,
    is_converged,
)

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "results" / "runs.csv"
PAGE = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
SMALL_VOXELS = 25  # labels this small (mean voxels in the test cases) are reported apart
BASE_COLUMNS = [
    "run_id", "sweep_id", "kernel", "loss", "lr", "split", "status", "diverged", "epochs", "best_epoch",
    "best_val_dice", "converged", "test_dice", "floor_dice", "num_parameters", "train_seconds", "commit",
]  # fmt: skip


# --- export: the store -> runs.csv -------------------------------------------------------------------


def export(uri: str, experiment: str, out: Path) -> Path:
    """One row per run of `experiment` in the store at `uri`, written to `out` (CSV)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"study_results: no experiment {experiment!r} in {uri}")
    runs = [r for r in client.search_runs([found.experiment_id], max_results=5000) if "kernel" in r.data.tags]
    rows = [_row(client, run) for run in sorted(runs, key=lambda r: r.info.start_time)]
    labels = sorted({k.split("/", 1)[1] for row in rows for k in row if k.startswith("test_dice/")})
    columns = BASE_COLUMNS + [f"test_dice/{n}" for n in labels] + [f"test_voxels/{n}" for n in labels]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "val_curve"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} runs -> {out}")
    return out


def _row(client, run) -> dict:
    tags, metrics = run.data.tags, run.data.metrics
    history = client.get_metric_history(run.info.run_id, "val/dice_mean")
    by_epoch = {m.step: m.value for m in history}
    curve = [by_epoch.get(e, math.nan) for e in range(1, max(by_epoch, default=0) + 1)]
    best = best_epoch(curve)  # the checkpoint the run kept (NaN epochs never chosen)
    row = {
        "run_id": run.info.run_id, "sweep_id": tags.get("sweep_id", ""), "kernel": tags["kernel"],
        "loss": tags.get("loss", ""), "lr": tags.get("lr", ""), "split": tags.get("split", ""),
        "status": run.info.status, "diverged": tags.get("diverged", ""), "epochs": len(curve),
        "best_epoch": best or "", "best_val_dice": curve[best - 1] if best else math.nan,
        "converged": is_converged(curve), "test_dice": metrics.get("test/dice_mean", math.nan),
        "floor_dice": metrics.get("floor/dice_mean", math.nan),
        "num_parameters": run.data.params.get("model.num_parameters", ""),
        "train_seconds": tags.get("train_seconds", ""), "commit": tags.get("mlflow.source.git.commit", ""),
        "val_curve": ";".join(f"{v:.6g}" for v in curve),
    }  # fmt: skip
    for key, value in metrics.items():
        if key.startswith("test/dice/") and not key.endswith("_n"):
            row[f"test_dice/{key.split('/', 2)[2]}"] = value
    row.update(_test_voxels(client, run.info.run_id))
    return row


def _test_voxels(client, run_id: str) -> dict:
    """Mean voxels of every label over the run's test cases, from its test_metrics.csv artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "test_metrics.csv", tmp)
        except Exception:  # a run that never reached its test (killed, diverged before best.pt)
            return {}
        per_label: dict[str, list[float]] = {}
        with open(path) as f:
            for line in csv.DictReader(f):
                per_label.setdefault(line["label"], []).append(float(line["true_voxels"]))
    return {f"test_voxels/{k}": statistics.fmean(v) for k, v in per_label.items()}


# --- page: runs.csv -> docs/results.md ------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _num(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _pct(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}±{100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def _lr_text(lr: float) -> str:
    exponent = math.log10(lr)
    return f"1e{exponent:g}" if abs(exponent - round(exponent * 2) / 2) < 1e-6 else f"{lr:g}"


def _label_groups(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(small, large) label names: small = at most SMALL_VOXELS voxels on average in the test cases."""
    sizes: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("test_voxels/") and math.isfinite(_num(value)):
                sizes.setdefault(key.split("/", 1)[1], []).append(_num(value))
    mean = {k: statistics.fmean(v) for k, v in sizes.items()}
    small = sorted((k for k, v in mean.items() if v <= SMALL_VOXELS), key=mean.get)
    return small, sorted(k for k in mean if k not in small)


def _group_dice(row: dict, names: list[str]) -> float:
    values = [_num(row.get(f"test_dice/{n}")) for n in names]
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _cells(rows: list[dict]) -> dict[tuple[str, str, float], list[dict]]:
    cells: dict[tuple[str, str, float], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["kernel"], row["loss"], _num(row["lr"])), []).append(row)
    return dict(
        sorted(cells.items(), key=lambda kv: (kv[0][0] != "conventional", kv[0][0], kv[0][1], kv[0][2]))
    )


def cell_table(rows: list[dict], small: list[str], large: list[str]) -> list[str]:
    lines = [
        "| kernel | loss | lr | runs | test Dice (%) | per split | labels > 25 voxels | labels <= 25 voxels "
        "| floor (%) | best epochs | unconverged |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for (kernel, loss, lr), cell in _cells(rows).items():
        done = [r for r in sorted(cell, key=lambda r: int(r["split"])) if r["status"] == "FINISHED"]
        columns = [
            kernel, loss, _lr_text(lr), str(len(done)),
            _pct([_num(r["test_dice"]) for r in done]),
            ", ".join(f"{100 * _num(r['test_dice']):.1f}" for r in done),
            _pct([_group_dice(r, large) for r in done]),
            _pct([_group_dice(r, small) for r in done]),
            _pct([_num(r["floor_dice"]) for r in done]),
            ", ".join(r["best_epoch"] for r in done),
            str(sum(r["converged"].lower() == "false" for r in cell)),
        ]  # fmt: skip
        lines.append("| " + " | ".join(columns) + " |")
    return lines


def _run_name(row: dict) -> str:
    return f"{row['kernel']}/{row['loss']}/lr{_lr_text(_num(row['lr']))}/split{row['split']}"


def verdict_lines(verdict: Verdict) -> list[str]:
    numbers = ", ".join(f"{k} {v:+.1f} pp" for k, v in verdict.numbers.items())
    lines = [f"- **Claim {verdict.claim}**: **{verdict.outcome}**" + (f" ({numbers})" if numbers else "")]
    lines += [f"  - {m}" for m in verdict.missing]
    return lines


def generated(rows: list[dict]) -> tuple[str, list[str]]:
    """The page's title and its generated section, from the runs table alone."""
    splits = sorted({int(r["split"]) for r in rows})
    verdicts = [claim_a(rows, SPLITS), claim_b(rows, SPLITS)]
    small, large = _label_groups(rows)
    commits = sorted({r["commit"] for r in rows})
    floors = [_num(r["floor_dice"]) for r in rows]
    seconds = sum(_num(r["train_seconds"]) for r in rows if math.isfinite(_num(r["train_seconds"])))
    title = "# Results: " + "; ".join(f"Claim {v.claim} {v.outcome}" for v in verdicts) + " (pre-registered)"
    params = {r["kernel"]: r["num_parameters"] for r in rows if r["num_parameters"]}
    lines = [
        BEGIN, "", "## Verdicts", "", "By the pre-registered rules above, applied to `docs/results/runs.csv`"
        " (`medexp.report.claims`):", "", *[line for v in verdicts for line in verdict_lines(v)], "",
        "## The runs", "",
        f"{len(rows)} runs, {len(splits)} splits; commit(s) {', '.join(c[:12] for c in commits)}; "
        f"training time {seconds / 3600:.2f} h summed over runs. Parameters: "
        + ", ".join(f"{k} {int(v):,}" for k, v in sorted(params.items())) + ".",
        "",
        f"The no-learning floor (each split's training cases' per-voxel majority label, scored on its test "
        f"cases) is {_pct(floors)} mean Dice over the runs: a model below it has learned nothing useful.",
        "",
        "Mean ± standard deviation over splits of the per-volume test Dice (mean over the labels), then the "
        "same over the large and the small labels only, the floor, the best epoch of each split (chosen on "
        "validation) and the number of unconverged runs:",
        "",
        *cell_table(rows, small, large), "",
        f"Small labels (at most {SMALL_VOXELS} voxels on average in the test cases at this size): "
        + (", ".join(small) if small else "none") + ".",
        "",
    ]  # fmt: skip
    below = [_run_name(r) for r in rows if _num(r["test_dice"]) <= _num(r["floor_dice"])]
    listed = (": " + ", ".join(below)) if below else ""
    lines += [f"Runs at or below their floor: {len(below)} of {len(rows)}{listed}.", "", END]
    return title, lines


def write_page(rows: list[dict], page: Path) -> Path:
    """Replace the title and the generated section of `page`; the pre-registration and the rest stay."""
    text = page.read_text()
    title, lines = generated(rows)
    body = "\n".join(lines)
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    else:  # first time: after the pre-registration, before the exploratory grid
        marker = "## Exploratory grid"
        text = text.replace(marker, body + "\n\n" + marker, 1)
    text = re.sub(r"\A# .*", title, text, count=1)
    page.write_text(text)
    print(f"{page}: {title[2:]}")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="the store's runs of the study -> runs.csv")
    ex.add_argument("--tracking-uri", required=True)
    ex.add_argument("--experiment", default="study_claims")
    ex.add_argument("--out", type=Path, default=RUNS)
    pg = sub.add_parser("page", help="runs.csv -> the generated part of docs/results.md")
    pg.add_argument("--runs", type=Path, default=RUNS)
    pg.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args()
    if args.command == "export":
        export(args.tracking_uri, args.experiment, args.out)
    else:
        write_page(read_rows(args.runs), args.out)


if __name__ == "__main__":
    main()
