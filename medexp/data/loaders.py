"""DataLoaders for one split: cached deterministic preprocessing, random augmentation on top, DDP-aware.

A case may carry "slices": the 2D items cut from one volume (`dataset.spatial_dims=2` on 3D data). Splits are
made over cases, i.e. by volume (patient), and the loader then trains and evaluates on their slices, so no
patient has slices in two parts of a split.
"""

from __future__ import annotations

import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose
from torch.utils.data.distributed import DistributedSampler

from medexp.data.transforms import load_transforms


def expand_slices(cases: list[dict]) -> list[dict]:
    """The items a loader iterates: each case itself, or its "slices" if it has them."""
    return [item for case in cases for item in case.get("slices", [case])]


def _reader(items: list[dict]) -> str | None:
    """Reader for `items`: "numpy" for .npy arrays of the preprocessing cache, else None (by suffix)."""
    return "numpy" if items and str(items[0]["image"]).endswith(".npy") else None


def make_loader(
    cases: list[dict],
    *,
    batch_size: int,
    train: bool,
    augmentation: list | None = None,
    preprocess: list | None = None,
    num_workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A loader over `cases`; deterministic transforms are cached in memory once, augmentation runs per epoch
    (in `num_workers` worker processes when > 0).

    Training loaders shuffle (and shard across DDP ranks); evaluation loaders keep the order, batch 1.
    """
    items = [{k: v for k, v in item.items() if k != "slices"} for item in expand_slices(cases)]
    steps = (
        load_transforms(_reader(items)) + list(preprocess or []) + (list(augmentation or []) if train else [])
    )
    dataset = CacheDataset(items, Compose(steps), num_workers=None, progress=False, copy_cache=False)
    sampler = None
    if train:  # also for one process: the same seed then gives the same global batches for any world size
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size if train else 1,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=False,
        persistent_workers=num_workers > 0,
    )
