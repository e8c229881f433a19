"""`medexp evaluate RUN_ID`: re-evaluate a run's best checkpoint and log the metrics to the same run.

The run's config comes from its checkpoint (data from elsewhere: `_target_`s are only built from
build.ALLOWED_PREFIXES). Test metrics are logged as `test/...` (as at the end of training); validation
metrics of the best checkpoint as `val_best/...`, so the per-epoch `val/...` curves stay untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from medexp import build, checkpoint
from medexp.config import ConfigError, TrainConfig
from medexp.data.base import DataError
from medexp.data.loaders import make_loader
from medexp.data.splits import load_or_make_splits, select
from medexp.evaluation import evaluate, foreground_means, write_case_csv
from medexp.tracking import RunTracker, find_output_dir, resolve_uri

PREFIX = {"test": "test", "val": "val_best"}


def evaluate_run(run_id: str, split: str = "test", tracking_uri: str | None = None) -> dict[str, float]:
    """Evaluate run `run_id`'s best checkpoint on its `split` cases; log metrics and a per-case CSV.

    Returns:
        {"<prefix>/<metric>_mean": ..., "<prefix>/<metric>/<label>": ...}
    """
    if split not in PREFIX:
        raise ConfigError(f"--split {split}: expected one of {', '.join(PREFIX)}")
    uri = resolve_uri(tracking_uri)
    output_dir = Path(find_output_dir(run_id, uri))
    best = output_dir / "checkpoints" / "best.pt"
    if not best.exists():
        raise DataError(f"run {run_id}: no best checkpoint at {best} (diverged before the first validation?)")
    state = checkpoint.load(best)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(state["config"]))
    dataset = build.build_dataset(cfg)
    cases = dataset.prepare()
    info = dataset.info
    parts = select(cases, load_or_make_splits(info.root, [c["id"] for c in cases], cfg.n_splits), cfg.split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build.build_model(cfg, info.in_channels, info.num_classes, info.spatial_dims).to(device)
    model.load_state_dict(state["model"])
    loader = make_loader(parts[split], batch_size=1, train=False)
    ids, values = evaluate(
        model,
        loader,
        num_classes=info.num_classes,
        roi_size=info.shape,
        device=device,
        metrics=list(cfg.eval.metrics),
        spacing=info.spacing,
    )
    metrics = foreground_means(values, info.label_names, PREFIX[split])
    tracker = RunTracker()
    tracker.attach(uri, run_id)
    tracker.log_metrics(metrics, step=state["epoch"])
    tracker.log_artifact(write_case_csv(output_dir / f"{split}_metrics.csv", ids, values, info.label_names))
    return metrics
