"""`medexp evaluate RUN_ID`: re-evaluate a run's best checkpoint and log the metrics to the same run.

The run is restored from its checkpoint (medexp.run.restore: its config is data from elsewhere and is
refused if a `_target_` lies outside the allowlist). Test metrics are logged as `test/...` (as at the end
of training); validation metrics of the best checkpoint as `val_best/...`, so the per-epoch `val/...`
curves stay untouched. Evaluation is the training job's own (medexp.evaluation.inference.evaluate): one row
per volume, slices of a 2D model stacked back, each case's own spacing, and the empty-label rule (NaN,
left out of the means, each mean logged with its `_n`).

Before anything is evaluated, the checkpoint must be the run's own (its recorded run id; a best.pt copied
from another run is refused), the data are read from the folder the run recorded (`dataset.source`: an
nnU-Net id needs no $nnUNet_raw), and the cases scored are those the run recorded for the split when it
trained (one warning line says how many were added to or are missing from the data folder since).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from medexp.config.build import build_dataset
from medexp.data.loaders import make_loader
from medexp.data.splits import check_unique_ids, load_or_make_splits, select, split_ratios
from medexp.errors import ConfigError, DataError
from medexp.evaluation.inference import evaluate
from medexp.evaluation.summary import foreground_means, write_case_csv
from medexp.run.restore import restore
from medexp.tracking.runs import RunTracker
from medexp.tracking.store import resolve_uri

PREFIX = {"test": "test", "val": "val_best"}


def evaluate_run(run_id: str, split: str = "test", tracking_uri: str | None = None) -> dict[str, float]:
    """Evaluate run `run_id`'s best checkpoint on its `split` cases; log metrics and a per-case CSV.

    Returns:
        {"<prefix>/<metric>_mean": ..., "<prefix>/<metric>/<label>": ..., and their "_n" counts}
    """
    if split not in PREFIX:
        raise ConfigError(f"--split {split}: expected one of {', '.join(PREFIX)}")
    uri = resolve_uri(tracking_uri)
    run = restore(run_id, "best", uri)
    owner = run.state.get("run_id")
    if owner != run_id:  # e.g. another run's best.pt copied into this run's folder
        raise DataError(
            f"{run.path}: checkpoint of run {owner}, not of run {run_id}; evaluate run {owner}, or put run "
            f"{run_id}'s own best.pt back"
        )
    cfg = run.cfg
    recorded = run.state.get("info") or {}
    if recorded.get("source") and Path(recorded["source"]).is_dir():
        OmegaConf.update(cfg, "dataset.root", recorded["source"])  # the folder the run read, resolved
    dataset = build_dataset(cfg)
    cases = dataset.prepare()
    check_unique_ids(cases)
    info = dataset.info
    ids = [c["id"] for c in cases]
    splits = load_or_make_splits(info.root, ids, cfg.n_splits, ratios=split_ratios(cfg))
    parts = select(cases, splits, cfg.split)
    if split in recorded.get("split_cases", {}):
        parts[split] = recorded_cases(cases, recorded["split_cases"][split], parts[split], split, run_id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = evaluate(
        run.model(device, info),
        make_loader(parts[split], batch_size=1, train=False),
        num_classes=info.num_classes,
        roi_size=info.shape,
        device=device,
        metrics=list(cfg.eval.metrics),
        distance=cfg.eval.get("distance", "medexp"),  # configs logged before the key: the default
        spacing=info.spacing,
        ignore_label=info.ignore_index,
    )
    metrics = foreground_means(table.values, info.label_names, PREFIX[split])
    tracker = RunTracker()
    tracker.attach(uri, run_id)
    tracker.log_metrics(metrics, step=run.state["epoch"])
    csv_path = write_case_csv(
        run.output_dir / f"{split}_metrics.csv", table.ids, table.values, info.label_names, table.voxels
    )
    tracker.log_artifact(csv_path)
    return metrics


def recorded_cases(
    cases: list[dict], recorded: list[str], now: list[dict], split: str, run_id: str
) -> list[dict]:
    """The cases the run recorded for `split` when it trained, as far as the data folder still has them.

    Adding cases to the data folder reshuffles every split made from it, so the split made now may hold
    cases the run trained on; the recorded ids are what the run was tested on. One warning line says how
    many cases the split made now adds and how many recorded ones are missing.

    Raises:
        DataError: none of the recorded cases is left.
    """
    by_id = {str(c["id"]): c for c in cases}
    missing = [i for i in recorded if i not in by_id]
    added = sorted({str(c["id"]) for c in now} - set(recorded))
    kept = [by_id[i] for i in recorded if i in by_id]
    if not kept:
        raise DataError(
            f"run {run_id}: none of its {len(recorded)} recorded {split} case(s) is in the data folder"
        )
    if missing or added:
        print(
            f"medexp evaluate: warning: the {split} cases of run {run_id} changed since it trained: "
            f"{len(added)} added, {len(missing)} of the {len(recorded)} recorded missing; evaluating the "
            f"{len(kept)} recorded case(s) still in the data folder",
            file=sys.stderr,
        )
    return kept
