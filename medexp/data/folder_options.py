"""Pieces of the folder dataset (medexp.data.nifti) that need none of its state: the check of its settings,
the writing of one preprocessed case (and its slices) into the cache, and the loader items of the slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medexp.data import cache_io
from medexp.data.sizes import check_max_voxels
from medexp.data.transforms import FITS, NORMALIZATIONS
from medexp.errors import ConfigError

CHOICES = {
    "unlisted_labels": ("error", "background"),
    "layout": ("auto", "msd", "folders"),
    "normalize": NORMALIZATIONS,
    "fit": FITS,
}


def check_options(ds) -> None:
    """ConfigError naming the first `dataset.*` setting of `ds` (a NiftiDataset) that is out of range."""
    for key, allowed in CHOICES.items():
        if getattr(ds, key) not in allowed:
            raise ConfigError(f"dataset.{key}={getattr(ds, key)}: expected one of {', '.join(allowed)}")
    if ds.spatial_dims not in (2, 3) or len(ds.shape) != ds.spatial_dims:
        raise ConfigError(
            f"dataset.shape={ds.shape}: expected {ds.spatial_dims} sizes (dataset.spatial_dims)"
        )
    check_max_voxels(ds.max_voxels)
    if ds.slice_axis not in (0, 1, 2):
        raise ConfigError(f"dataset.slice_axis={ds.slice_axis}: expected 0, 1 or 2")
    spacing = cache_io.plain(ds.spacing) if cache_io.is_seq(ds.spacing) else [ds.spacing]
    if ds.spacing is not None and not all(isinstance(s, (int, float)) and s > 0 for s in spacing):
        raise ConfigError(f"dataset.spacing={ds.spacing}: expected a positive size in mm (or null)")
    orientation = ds.orientation
    if orientation is not None and (len(str(orientation)) != 3 or set(str(orientation)) - set("RASLPI")):
        raise ConfigError(f"dataset.orientation={orientation}: expected axis codes like RAS, or null")


def save_arrays(
    cache: Path, stem: str, image: np.ndarray, label: np.ndarray, slice_axis: int | None = None
) -> list[str]:
    """Write a case (image (C, *spatial), label (1, *spatial)) as .npy, and with `slice_axis` each of its
    2D slices too; returns the file names relative to the cache folder."""
    files = [f"{stem}_image.npy", f"{stem}_label.npy"]
    cache_io.save_npy(cache / files[0], image)
    cache_io.save_npy(cache / files[1], label)
    if slice_axis is not None and image.ndim == 4:
        axis = slice_axis + 1  # (C, X, Y, Z): spatial axis k is array axis k + 1
        for k in range(image.shape[axis]):
            name = stem.replace("cases/", "slices/", 1)
            pair = [f"{name}_s{k:03d}_image.npy", f"{name}_s{k:03d}_label.npy"]
            cache_io.save_npy(cache / pair[0], np.take(image, k, axis=axis))  # (C, *in-plane)
            cache_io.save_npy(cache / pair[1], np.take(label, k, axis=axis))  # (1, *in-plane)
            files += pair
    return files


def slice_items(volume: str, files: list[str], slice_axis: int, spacing: list[float]) -> list[dict]:
    """The loader items of a volume's cached 2D slices (files: image, label, image, label, ...); each says
    which volume it belongs to, so evaluation can stack their predictions back (evaluation.inference)."""
    return [
        {
            "id": f"{volume}_s{i // 2:03d}",
            "image": files[i],
            "label": files[i + 1],
            "volume": volume,
            "slice": i // 2,
            "slice_axis": slice_axis,
            "volume_spacing": spacing,
        }
        for i in range(0, len(files), 2)
    ]
