"""What a training job writes about itself besides metrics: MLflow tags, the checkpoint payload, the record
of the Gabor implementations that ran, and the closing summary on the console."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from medexp.config.build import kernel_kind
from medexp.config.flat import to_yaml
from medexp.data.base import DatasetInfo
from medexp.data.layout import nnunet_id
from medexp.run import checkpoint
from medexp.run.progress import print_summary
from medexp.tracking.runs import RunTracker

TAGGED_GROUPS = ("loss", "head", "model", "input_layer", "dataset", "optim", "sched")


def run_name(cfg: DictConfig, job: dict) -> str:
    """The MLflow run name: kernel-loss-lr-split, unless the job names itself."""
    loss = job.get("choices", {}).get("loss", "?")
    return job.get("name") or f"{kernel_kind(cfg)}-{loss}-lr{cfg.lr:g}-split{cfg.split}"


def run_tags(cfg: DictConfig, job: dict, info: DatasetInfo, output_dir: Path) -> dict[str, str]:
    """Tags of a training run: the group choices, lr, split, seed, overrides, sweep id, labels, output dir."""
    choices = job.get("choices", {})
    tags = {g: str(choices.get(g, "?")) for g in TAGGED_GROUPS}
    tags.update(
        kernel=kernel_kind(cfg),
        lr=f"{cfg.lr:g}",
        split=str(cfg.split),
        seed=str(cfg.seed),
        overrides=" ".join(job.get("overrides", [])),
        sweep_id=str(job.get("parent_run_id") or ""),
        num_classes=str(info.num_classes),
        label_names=",".join(info.label_names),
    )
    tags["medexp.output_dir"] = str(output_dir.resolve())
    if info.source:  # the data folder as resolved: an nnU-Net id in dataset.root needs $nnUNet_raw
        tags["dataset.source"] = info.source
        nnunet = nnunet_id(info.source)
        if nnunet is not None:
            tags["dataset.nnunet_id"] = nnunet
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        tags["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags


def checkpoint_state(
    model, optimizer, scheduler, *, epoch: int, best: float, cfg: DictConfig, run_id, metrics: dict, info
) -> dict[str, Any]:
    """Everything a checkpoint holds (docs/design.md §9), in weights_only-loadable types."""
    return {
        "metrics": metrics,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best": best,
        "rng": checkpoint.rng_state(),
        "config": to_yaml(cfg),
        "run_id": run_id,
        "info": dataclasses.asdict(info),  # classes, channels, shape: enough to predict without the data
    }


def log_conv_impls(model: torch.nn.Module, output_dir: Path, tracker: RunTracker) -> None:
    """Record the convolution implementation every Gabor layer ran (conv_impls.json and a `conv_impls` tag).

    kernel.impl=auto picks by measured speed, so two runs of one config may pick differently and then differ
    in float rounding; the record says what ran, and a fixed kernel.impl repeats runs exactly.
    """
    used = {name: m.used_impl for name, m in model.named_modules() if getattr(m, "used_impl", None)}
    if not used:
        return
    path = output_dir / "conv_impls.json"
    path.write_text(json.dumps(used, indent=1))
    tracker.log_artifact(path)
    counts = collections.Counter(used.values())
    tracker.set_tags({"conv_impls": ",".join(f"{impl}:{n}" for impl, n in sorted(counts.items()))})


def print_result(result: dict, uri: str, output_dir: Path) -> None:
    """The closing table of `medexp train`: run id, store, status, epochs, time, test means, output dir."""
    test = result.get("test", {})
    rows = [("MLflow run", str(result["run_id"])), ("tracking uri", uri), ("status", result["status"])]
    rows += [("epochs", str(result["epoch"])), ("train time", f"{result['train_seconds']:.1f} s")]
    shown = [k for k in test if k.endswith("_mean") or k.startswith("test/dice/")]
    rows += [(k, f"{test[k]:.4f}") for k in shown if not k.endswith("_n")]  # `_n`: case counts, not scores
    rows.append(("output dir", str(output_dir)))
    print_summary(rows)
