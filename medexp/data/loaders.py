"""DataLoaders for one split: cached deterministic preprocessing, random augmentation on top, DDP-aware.

A case may carry "slices": the 2D items cut from one volume (`dataset.spatial_dims=2` on 3D data). Splits are
made over cases, i.e. by volume (patient), and the loader then trains and evaluates on their slices, so no
patient has slices in two parts of a split.

Augmentation runs in the loader's worker processes (`num_workers`, "auto" by default: see
`auto_num_workers`), or, with `DeviceAugment`, on the batch after it reached the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose
from torch import Tensor
from torch.utils.data.distributed import DistributedSampler

from medexp.data.transforms import load_transforms

# Most loader workers "auto" gives one GPU: enough for the model that needs the most cores at 128^3 on a
# fast GPU (docs/performance.md, "Data pipeline": cores per GPU); more would only hold more batches in memory.
MAX_AUTO_WORKERS = 8


def expand_slices(cases: list[dict]) -> list[dict]:
    """The items a loader iterates: each case itself, or its "slices" if it has them."""
    return [item for case in cases for item in case.get("slices", [case])]


def _reader(items: list[dict]) -> str | None:
    """Reader for `items`: "numpy" for .npy arrays of the preprocessing cache, else None (by suffix)."""
    return "numpy" if items and str(items[0]["image"]).endswith(".npy") else None


def auto_num_workers(cpus: int, devices: int, accelerator: str) -> int:
    """trainer.num_workers=auto: loader worker processes for one training process.

    On CPU 0: the training step itself uses every core, and the loader's share of a CPU step is ~2%
    (docs/performance.md), so workers would only compete with it. On a GPU, the process's share of the
    machine's cores (cpus / devices, the devices sharing them) minus one for the training loop itself,
    at most MAX_AUTO_WORKERS.

    Args:
        cpus: cores this process may run on (os.sched_getaffinity).
        devices: GPUs sharing those cores (all of the machine's GPUs, or the job's on a cluster).
        accelerator: the device type training runs on ("cpu", "cuda", ...).
    """
    if accelerator == "cpu":
        return 0
    share = cpus // max(1, devices)
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


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
    pin_memory: bool = False,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A loader over `cases`; deterministic transforms are cached in memory once, augmentation runs per epoch
    (in `num_workers` worker processes when > 0).

    Training loaders shuffle (and shard across DDP ranks); evaluation loaders keep the order, batch 1.
    `pin_memory` (for CUDA), `persistent_workers` and `prefetch_factor` (batches in flight per worker) are
    torch DataLoader's; the last two only apply with workers.
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
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


class DeviceAugment:
    """The random training transforms run on the device, on a batch already there
    (`trainer.augment_on_device=true`): each image of the batch goes through the MONAI dictionary
    transforms (e.g. RandAffined built with `device=` the training device, so its grid and resampling run
    there), in the training process, with its own seeded random state.

    MONAI's dictionary transforms take one channel-first item, hence the loop over the batch; the
    resampling of a 128^3 volume is one kernel launch per image and key on a GPU.

    Args:
        transforms: MONAI dictionary transforms on "image" and "label".
        seed: seed of their random state (the run's seed + rank, so ranks augment differently).
    """

    def __init__(self, transforms: Sequence, seed: int = 0) -> None:
        self.transform = Compose(list(transforms))
        self.transform.set_random_state(seed=seed)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, *S) images and (B, 1, *S) labels -> the same shapes, dtypes and device, augmented."""
        images, labels = [], []
        for one_image, one_label in zip(image, label, strict=True):  # each (C, *S) / (1, *S)
            out = self.transform({"image": one_image, "label": one_label})
            images.append(torch.as_tensor(out["image"]).as_subclass(Tensor).to(image.dtype))
            labels.append(torch.as_tensor(out["label"]).as_subclass(Tensor).to(label.dtype))
        return torch.stack(images), torch.stack(labels)  # (B, C, *S), (B, 1, *S)
