"""Write docs/results.md from a finished study sweep: the Fig. 3 and Table 1 analogues of `medexp report`
(PNG and tables), the numbers behind the trends, the exact command, its wall time and the spread over
splits, all read from the MLflow store; the prose about the trends goes where the page marks it.

    medexp train -m experiment=study_cpu         # the study (about 90 minutes on a 2-core CPU)
    python scripts/study_results.py              # its latest sweep -> docs/results.md + docs/results/

Options: --tracking-uri (default: medexp's store), --experiment (study_cpu), --sweep PARENT_RUN_ID (default:
the experiment's latest sweep), --lr (Table 1's learning rate, 1e-3), --out (docs/results.md; the report's
files go to a folder `results/` next to it). The page is rewritten on every call; prose written between
the PROSE markers of an existing page is kept.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medexp.report.aggregate import LR_REL_TOL  # noqa: E402
from medexp.report.make import make_report  # noqa: E402
from medexp.report.tables import lr_label  # noqa: E402
from medexp.tracking import queries  # noqa: E402
from medexp.tracking.store import client, resolve_uri  # noqa: E402

PROSE = {
    "lr": "the learning-rate trends: PCC vs Dice vs CE (cf. the paper's Fig. 3 and Sec. 3.2)",
    "kernels": "conventional vs mixed vs Gabor at lr 1e-3, with their parameter counts (cf. Table 1)",
    "splits": "the spread over splits",
}
SETUP_KEYS = [
    ("dataset", "dataset._target_"), ("shape", "dataset.shape"), ("cases", "dataset.num_cases"),
    ("splits", "n_splits"), ("epochs", "trainer.max_epochs"), ("batch", "trainer.batch_size"),
    ("devices", "trainer.devices"), ("network", "model._target_"), ("widths", "model.channels"),
    ("Gabor kernel", "kernel.gabor_size"), ("optimiser", "optim._target_"),
    ("augmentation", "augment._target_"), ("metrics", "eval.metrics"),
]  # fmt: skip


def latest_sweep(uri: str, experiment: str) -> str:
    experiments = queries.list_experiments(uri)
    if experiment not in experiments:
        raise SystemExit(f"study_results: no experiment {experiment!r} in {uri} (run the study first)")
    parents = [
        r
        for r in queries.search_runs(uri, [experiments[experiment]])
        if r["tags"].get("sweep_id") == r["run_id"]
    ]
    if not parents:
        raise SystemExit(f"study_results: experiment {experiment!r} has no sweep (medexp train -m ...)")
    return max(parents, key=lambda r: r["start_time"])["run_id"]


def sweep_command(sweep_dir: str | None) -> str:
    """`medexp train -m <overrides>` as typed, from the sweep folder's multirun.yaml (Hydra writes it)."""
    path = Path(sweep_dir or "") / "multirun.yaml"
    if not sweep_dir or not path.exists():
        return "medexp train -m experiment=study_cpu  (command not recorded: multirun.yaml missing)"
    task = yaml.safe_load(path.read_text())["hydra"]["overrides"]["task"]
    return " ".join(["medexp train -m", *task])


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    return f"{model}, {os.cpu_count()} logical cores, {platform.system()}"


def kept_prose(path: Path) -> dict[str, str]:
    """Prose the lead wrote between the markers of an existing page, by key."""
    if not path.exists():
        return {}
    found = re.findall(r"<!-- PROSE:(\w+) -->\n(.*?)\n<!-- /PROSE -->", path.read_text(), flags=re.S)
    return {key: text for key, text in found if "TO BE WRITTEN" not in text}


def table_body(markdown: str) -> str:
    """A report table without its '# ' title (the page gives its own headings)."""
    return "\n".join(line for line in markdown.splitlines() if not line.startswith("# ")).strip()


def trend_rows(figure_csv: list[dict], rates: list[float]) -> list[str]:
    """Per kernel and loss: the best lr and how much the Dice falls from it to the extreme rates."""
    lines = [
        "| kernel | loss | best lr | Dice at best | best - Dice at 1e-4 | best - Dice at 1e-2 |",
        "|---|---|---|---:|---:|---:|",
    ]
    series: dict[tuple[str, str], dict[float, float]] = {}
    for row in figure_csv:
        if row["dice_mean"]:
            series.setdefault((row["kernel"], row["loss"]), {})[float(row["lr"])] = float(row["dice_mean"])
    for (kernel, loss), by_lr in series.items():
        best_lr = max(by_lr, key=by_lr.get)
        drops = []
        for lr in (min(rates), max(rates)):
            value = next((v for k, v in by_lr.items() if math.isclose(k, lr, rel_tol=LR_REL_TOL)), None)
            drops.append("–" if value is None else f"{100 * (by_lr[best_lr] - value):.1f}")
        best = f"{100 * by_lr[best_lr]:.1f}"
        lines.append(f"| {kernel} | {loss} | {lr_label(best_lr)} | {best} | {drops[0]} | {drops[1]} |")
    return lines


def kernel_rows(table_csv: list[dict]) -> list[str]:
    """At Table 1's lr: each kernel's average Dice minus the conventional one's, per loss, and sizes."""
    lines = [
        "| loss | kernel | parameters | average Dice (%) | minus conventional (pp) |",
        "|---|---|---:|---:|---:|",
    ]
    conventional = {r["loss"]: r for r in table_csv if r["kernel"] == "conventional"}
    for row in table_csv:
        mean = float(row["average_mean"]) if row["average_mean"] else math.nan
        base = conventional.get(row["loss"])
        ref = float(base["average_mean"]) if base and base["average_mean"] else math.nan
        diff = "–" if math.isnan(mean) or math.isnan(ref) else f"{100 * (mean - ref):+.1f}"
        params = f"{int(row['parameters']):,}" if row["parameters"] else "–"
        text = "–" if math.isnan(mean) else f"{100 * mean:.1f}"
        lines.append(f"| {row['loss']} | {row['kernel']} | {params} | {text} | {diff} |")
    return lines


def read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def spread(figure_csv: list[dict]) -> tuple[float, float, int]:
    """(mean, largest) std over splits of the Fig. 3 cells in percentage points, and the cells counted."""
    stds = [100 * float(r["dice_std"]) for r in figure_csv if r["dice_std"]]
    return (sum(stds) / len(stds) if stds else math.nan, max(stds, default=math.nan), len(stds))


def prose_block(key: str, kept: dict[str, str]) -> list[str]:
    text = kept.get(key, f"**TO BE WRITTEN after the run: {PROSE[key]}.**")
    return [f"<!-- PROSE:{key} -->", text, "<!-- /PROSE -->"]


def write_page(uri: str, sweep: str, lr: float, out: Path) -> Path:
    files_dir = out.parent / "results"
    report = make_report(uri, sweep=sweep, lr=lr, out_dir=files_dir)
    parent = client(uri).get_run(sweep)
    runs = [r for r in queries.search_runs(uri, [parent.info.experiment_id], f"tags.sweep_id = '{sweep}'")]
    jobs = [r for r in runs if r["run_id"] != sweep and "kernel" in r["tags"]]
    finished = [r for r in jobs if r["status"] == "FINISHED"]
    diverged = sum(r["tags"].get("diverged") == "true" for r in finished)
    wall = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000
    train = sum(float(r["tags"].get("train_seconds", 0) or 0) for r in finished)
    params = finished[0]["params"] if finished else {}
    figure_csv = read_csv(files_dir / "fig3_dice_vs_lr.csv")
    table_csv = read_csv(files_dir / f"table1_lr{lr:g}.csv")
    mean_std, max_std, cells = spread(figure_csv)
    kept = kept_prose(out)
    lines = [
        "# Results: the papers' findings reproduced with medexp",
        "",
        "<!-- Generated by scripts/study_results.py from the MLflow store; only the PROSE blocks are"
        " hand-written (they survive a rerun of the script). -->",
        "",
        "## The study",
        "",
        f"- Command: `{sweep_command(parent.data.tags.get('medexp.sweep_dir'))}`, then "
        "`python scripts/study_results.py`",
        f"- Wall time: {duration(wall)} for {len(jobs)} jobs ({len(finished)} finished, {diverged} of them "
        f"diverged, {len(jobs) - len(finished)} not finished); {duration(train)} of it training",
        f"- Machine: {machine()}",
        f"- Store: `{uri}`, sweep (parent run) `{sweep}`, status {parent.info.status}",
        "- Setup: " + "; ".join(f"{name} {params[key]}" for name, key in SETUP_KEYS if key in params),
        "",
        "## Fig. 3 analogue: test Dice against the learning rate",
        "",
        "![Fig. 3 analogue](results/fig3_dice_vs_lr.png)",
        "",
        table_body((files_dir / "fig3_dice_vs_lr.md").read_text()),
        "",
        "Per kernel and loss, the best learning rate and how far the Dice (percentage points) falls from it "
        "at the smallest and the largest rate:",
        "",
        *trend_rows(figure_csv, report.learning_rates),
        "",
        *prose_block("lr", kept),
        "",
        f"## Table 1 analogue: per-label test Dice at lr {lr_label(lr)}",
        "",
        table_body((files_dir / f"table1_lr{lr:g}.md").read_text()),
        "",
        *kernel_rows(table_csv),
        "",
        *prose_block("kernels", kept),
        "",
        "## Spread over splits",
        "",
        f"Sample std over splits of the Fig. 3 cells: {mean_std:.1f} percentage points on average, "
        f"{max_std:.1f} at most ({cells} cells with two or more splits; the paper: under 1 on average).",
        "",
        *prose_block("splits", kept),
        "",
        "## Files",
        "",
        "`results/`: `fig3_dice_vs_lr.png`, `fig3_dice_vs_lr.md`/`.csv`, "
        f"`table1_lr{lr:g}.md`/`.csv`, `runs.csv` (every counted run), written by "
        f"`medexp report --sweep {sweep}` and logged to the sweep's parent run.",
        "",
    ]
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="study_cpu")
    parser.add_argument("--sweep", default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    uri = resolve_uri(args.tracking_uri)
    sweep = args.sweep or latest_sweep(uri, args.experiment)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_page(uri, sweep, args.lr, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
