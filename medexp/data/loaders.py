"""DataLoaders for one split: cached deterministic preprocessing, random augmentation on top, DDP-aware."""

from __future__ import annotations

import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose
from torch.utils.data.distributed import DistributedSampler

from medexp.data.transforms import load_transforms


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
    """A loader over `cases`; deterministic transforms are cached in memory once, augmentation runs per epoch.

    Training loaders shuffle (and shard across DDP ranks); evaluation loaders keep the order, batch 1.
    """
    steps = load_transforms() + list(preprocess or []) + (list(augmentation or []) if train else [])
    dataset = CacheDataset(cases, Compose(steps), num_workers=None, progress=False, copy_cache=False)
    sampler = None
    if world_size > 1 and train:
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
