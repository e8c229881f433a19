"""The data side of a training job: the dataset prepared once (rank 0 first), its split, and the loaders."""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig

from medexp.config.build import build_augmentation, build_dataset, instantiate
from medexp.data.base import DatasetInfo
from medexp.data.loaders import DeviceAugment, auto_num_workers, make_loader
from medexp.data.splits import check_n_splits, check_unique_ids, load_or_make_splits, select, split_ratios
from medexp.run import dist
from medexp.run.gpus import gpu_count


@dataclass
class JobData:
    """A job's dataset description, its split's cases and the loaders built on them."""

    info: DatasetInfo
    parts: dict[str, list[dict]]
    train_loader: Any
    val_loader: Any
    loader_args: dict = field(default_factory=dict)
    device_augment: DeviceAugment | None = None  # trainer.augment_on_device: augmentation after the copy

    def loader(self, part: str):
        """An evaluation loader (batch 1, in order, one process) over the cases of `part`."""
        return make_loader(
            self.parts[part], batch_size=1, train=False, **{**self.loader_args, "world_size": 1}
        )


def job_data(cfg: DictConfig, ctx: dist.DistContext) -> JobData:
    """Dataset, split and loaders. Rank 0 prepares (generates / caches) first; the others then read it."""
    check_n_splits(cfg.n_splits)  # the bound that needs no cases, before any case is read
    dataset = build_dataset(cfg)
    if not ctx.is_main:
        dist.barrier(ctx)
    cases = dataset.prepare()
    check_unique_ids(cases)
    info = dataset.info
    ids = [c["id"] for c in cases]
    splits = load_or_make_splits(info.root, ids, cfg.n_splits, ratios=split_ratios(cfg))
    if ctx.is_main:
        dist.barrier(ctx)
    parts = select(cases, splits, cfg.split)
    # the split's case ids travel with the info into every checkpoint: `medexp evaluate` compares them
    info = dataclasses.replace(info, split_cases={p: [str(c["id"]) for c in cs] for p, cs in parts.items()})
    augmentation = build_augmentation(cfg, info.spatial_dims, info.shape)
    device_augment = None
    if cfg.trainer.augment_on_device:
        device_augment = _device_augment(cfg, info, ctx)
        augmentation = []
    loader_args = dict(world_size=ctx.world_size, rank=ctx.rank, seed=cfg.seed, **loader_settings(cfg, ctx))
    train_loader = make_loader(
        parts["train"],
        batch_size=cfg.trainer.batch_size,
        train=True,
        augmentation=augmentation,
        **loader_args,
    )
    val_loader = make_loader(parts["val"], batch_size=1, train=False, **loader_args) if ctx.is_main else None
    return JobData(info, parts, train_loader, val_loader, loader_args, device_augment)


def loader_settings(cfg: DictConfig, ctx: dist.DistContext) -> dict:
    """make_loader's worker and memory settings from cfg.trainer; num_workers=auto resolved for this
    process (medexp.data.loaders.auto_num_workers)."""
    t = cfg.trainer
    workers = t.num_workers
    if workers == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))  # training processes on this node
        devices = max(local, gpu_count()) if ctx.device.type == "cuda" else local
        workers = auto_num_workers(cpus, devices, ctx.device.type)
    return dict(
        num_workers=int(workers),
        pin_memory=bool(t.pin_memory) and ctx.device.type == "cuda",
        persistent_workers=bool(t.persistent_workers),
        prefetch_factor=int(t.prefetch_factor),
    )


def _device_augment(cfg: DictConfig, info: DatasetInfo, ctx: dist.DistContext) -> DeviceAugment:
    """cfg.augment built for the training device (factories that take `device`, e.g. random_affine), run
    on each batch after its copy there; seeded with the run's seed + rank."""
    factory = instantiate(cfg.augment, "augment")
    extra = {"device": ctx.device} if "device" in inspect.signature(factory).parameters else {}
    transforms = factory(spatial_dims=info.spatial_dims, shape=list(info.shape), **extra)
    return DeviceAugment(transforms, seed=cfg.seed + ctx.rank)


def class_frequencies(loader, num_classes: int) -> list[float]:
    """Fraction of voxels of each class over the (un-augmented, cached) training cases."""
    counts = np.zeros(num_classes)
    for item in loader.dataset._cache:
        labels = np.asarray(item["label"]).ravel().astype(np.int64)
        counts += np.bincount(labels, minlength=num_classes)[:num_classes]
    return (counts / max(counts.sum(), 1)).tolist()
