"""`medexp evaluate RUN_ID`: re-evaluate a run's best checkpoint and log the metrics to the same run.

The run is restored from its checkpoint (medexp.run.restore: its config is data from elsewhere and is
refused if a `_target_` lies outside the allowlist). Test metrics are logged as `test/...` (as at the end
of training); validation metrics of the best checkpoint as `val_best/...`, so the per-epoch `val/...`
curves stay untouched. Evaluation is the training job's own (medexp.evaluation.inference.evaluate): one row
per volume, slices of a 2D model stacked back, each case's own spacing, and the empty-label rule (NaN,
left out of the means, each mean logged with its `_n`).
"""

from __future__ import annotations

import torch

from medexp.config.build import build_dataset
from medexp.data.loaders import make_loader
from medexp.data.splits import load_or_make_splits, select, split_ratios
from medexp.errors import ConfigError
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
    cfg = run.cfg
    dataset = build_dataset(cfg)
    cases = dataset.prepare()
    info = dataset.info
    ids = [c["id"] for c in cases]
    splits = load_or_make_splits(info.root, ids, cfg.n_splits, ratios=split_ratios(cfg))
    parts = select(cases, splits, cfg.split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = evaluate(
        run.model(device, info),
        make_loader(parts[split], batch_size=1, train=False),
        num_classes=info.num_classes,
        roi_size=info.shape,
        device=device,
        metrics=list(cfg.eval.metrics),
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
