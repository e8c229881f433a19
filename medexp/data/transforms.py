"""MONAI transform pipelines: loading, and the deterministic preprocessing of Wong & Moradi 3.1 (run once per
case and cached on disk by the NIfTI dataset). The random augmentation is medexp.data.augment."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

KEYS = ("image", "label")
NORMALIZATIONS = ("zscore", "zscore_nonzero", "minmax", "none")
FITS = ("pad_resize", "crop", "resize")  # how a resampled image is brought to the target size
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel affines are RAS


def load_transforms(reader: str | None = None) -> list:
    """Read image and label files into channel-first float/int tensors.

    Args:
        reader: None picks MONAI's reader by file suffix (NIfTI, PNG, ...); "numpy" reads the channel-first
            .npy arrays (C, *spatial) of the preprocessing cache.
    """
    if reader == "numpy":
        load = mt.LoadImaged(keys=KEYS, reader="NumpyReader", channel_dim=0, image_only=True)
    else:
        load = mt.LoadImaged(keys=KEYS, image_only=True)
    return [
        load,
        mt.EnsureChannelFirstd(keys=KEYS),
        mt.EnsureTyped(keys="image", dtype="float32"),
        mt.EnsureTyped(keys="label", dtype="uint8"),
    ]


def padded_size(size: Sequence[int], target: Sequence[int]) -> list[int]:
    """Smallest zero-padded size >= `size` with the aspect ratio of `target`, so that resizing it to `target`
    scales every axis by the same factor (isotropic voxels stay isotropic). A target of -1 keeps the axis.

    Example: size (18, 20, 19), target (16, 16, 16) -> (20, 20, 20).
    """
    scale = max(s / t for s, t in zip(size, target, strict=True) if t > 0)
    return [s if t <= 0 else max(s, math.ceil(scale * t - 1e-6)) for s, t in zip(size, target, strict=True)]


def fit_to_target(kind: str, resampled: Sequence[int], target: Sequence[int]) -> list:
    """Transforms that bring an image of size `resampled` to `target` (-1 keeps an axis):

    - "pad_resize" (Wong & Moradi 3.1): zero-pad to the aspect ratio of `target`, then resize (images
      trilinear/bilinear with anti-aliasing, labels nearest), so every axis is scaled alike;
    - "crop" (NeRD 3.2, "center-cropped to 160x224"): centre crop to `target`, zero-padding symmetrically
      where the image is smaller (MONAI ResizeWithPadOrCropd); no interpolation, the voxels keep their size;
    - "resize" (Nair et al. IV-B, "resized ... to 256x256"): resize straight to `target`, axes scaled
      independently.
    """
    mode = "trilinear" if len(target) == 3 else "bilinear"
    resize = mt.Resized(
        keys=KEYS, spatial_size=list(target), mode=(mode, "nearest"), anti_aliasing=(True, False)
    )
    if kind == "crop":
        return [mt.ResizeWithPadOrCropd(keys=KEYS, spatial_size=list(target), mode="constant")]
    if kind == "resize":
        return [resize]
    if kind != "pad_resize":
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {kind!r}")
    return [mt.SpatialPadd(keys=KEYS, spatial_size=padded_size(resampled, target), mode="constant"), resize]


def normalization(kind: str) -> list:
    """Intensity normalisation per channel: z-score (all voxels, or the non-zero ones), [0, 1], or none."""
    if kind == "zscore":
        return [mt.NormalizeIntensityd(keys="image", channel_wise=True)]
    if kind == "zscore_nonzero":
        return [mt.NormalizeIntensityd(keys="image", channel_wise=True, nonzero=True)]
    if kind == "minmax":
        return [mt.ScaleIntensityd(keys="image", minv=0.0, maxv=1.0, channel_wise=True)]
    return []


def preprocess_case(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    *,
    target: Sequence[int],
    spacing: Sequence[float] | None,
    orientation: str | None,
    normalize: str = "zscore",
    fit: str = "pad_resize",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Wong & Moradi 3.1: reorient, resample to isotropic spacing, zero-pad, resize to `target`; normalise.
    (`fit` chooses NeRD's centre crop or a plain resize instead of pad + resize: `fit_to_target`.)

    Args:
        image: (C, *spatial) float32 image (one channel per modality).
        label: (1, *spatial) uint8 class indices (already mapped from the file's label values).
        affine: (4, 4) voxel-to-world (RAS, mm) matrix of the stored image.
        target: output size per spatial axis; -1 keeps that axis as resampled (2D slicing of volumes).
        spacing: voxel size in mm per spatial axis (-1 keeps an axis), or None for no resampling.
        orientation: axis codes such as "RAS", or None to keep the stored axis order (3D only).
        normalize: one of NORMALIZATIONS.
        fit: one of FITS.

    Returns:
        (image (C, *target) float32, label (1, *target) uint8, record): the record holds the shapes after each
        step and the output voxel-to-world affine, enough to map a prediction back to the stored grid.
    """
    spatial_dims = image.ndim - 1
    meta_affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    data = {
        "image": MetaTensor(torch.as_tensor(image, dtype=torch.float32), affine=meta_affine),
        "label": MetaTensor(torch.as_tensor(label, dtype=torch.float32), affine=meta_affine.clone()),
    }
    steps = []
    if orientation and spatial_dims == 3:
        steps.append(mt.Orientationd(keys=KEYS, axcodes=orientation, labels=RAS_LABELS))
    if spacing is not None:
        steps.append(mt.Spacingd(keys=KEYS, pixdim=list(spacing), mode=("bilinear", "nearest")))
    if steps:
        data = mt.Compose(steps)(data)
    resampled = list(data["image"].shape[1:])
    padded = padded_size(resampled, target) if fit == "pad_resize" else resampled
    data = mt.Compose([*fit_to_target(fit, resampled, target), *normalization(normalize)])(data)
    out_affine = data["image"].affine.numpy()
    record = {
        "resampled_shape": resampled,
        "padded_shape": padded,
        "shape": list(data["image"].shape[1:]),
        "affine": out_affine.tolist(),
        "spacing": np.linalg.norm(out_affine[:spatial_dims, :spatial_dims], axis=0).round(6).tolist(),
    }
    image_out = data["image"].numpy().astype(np.float32)  # (C, *target)
    label_out = data["label"].numpy().round().astype(np.uint8)  # (1, *target)
    return image_out, label_out, record
