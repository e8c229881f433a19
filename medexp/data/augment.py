"""Random training augmentation, chosen by the `augment` config group (`_target_` + `_partial_`).

Each choice is a function (spatial_dims, shape, **settings) -> a list of MONAI dictionary transforms on
"image" and "label"; the runner supplies spatial_dims and the training shape.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai import transforms as mt
from monai.transforms.spatial.array import RandAffineGrid

from medexp.data.transforms import KEYS


class IsotropicRandAffineGrid(RandAffineGrid):
    """MONAI's random affine grid with one scale factor drawn for all axes.

    Wong & Moradi 2.4 give one scaling range (0.8-1.2) for the image; MONAI's RandAffineGrid draws a factor
    per axis, which also stretches the anatomy. Here the first axis's draw is used for every axis.
    """

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(data)
        if self.scale_params:
            self.scale_params = [self.scale_params[0]] * len(self.scale_params)


class PaperRandAffined(mt.RandAffined):
    """MONAI's RandAffined with an isotropic scale (IsotropicRandAffineGrid) and the image padded with each
    channel's minimum instead of 0.

    Images are normalised before augmentation (z-score makes 0 the mean intensity, not the background), so
    constant-0 padding would fill the border with mid-grey tissue. Bilinear resampling is linear, so
    resampling (image - min) with zero padding and adding min back equals padding with the minimum exactly.
    Labels keep nearest-neighbour resampling and 0 (background) padding.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        grid = self.rand_affine.rand_affine_grid
        self.rand_affine.rand_affine_grid = IsotropicRandAffineGrid(
            rotate_range=grid.rotate_range,
            shear_range=grid.shear_range,
            translate_range=grid.translate_range,
            scale_range=grid.scale_range,
            device=grid.device,
            lazy=grid.lazy,
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict:
        d = dict(data)
        image = torch.as_tensor(d["image"])  # (C, *spatial)
        spatial = tuple(range(1, image.ndim))
        low = image.amin(dim=spatial, keepdim=True).as_subclass(torch.Tensor)  # (C, 1, ..., 1)
        d["image"] = d["image"] - low
        out = super().__call__(d, lazy)
        out["image"] = out["image"] + low.to(out["image"].device)
        return out


def random_affine(
    spatial_dims: int,
    shape: Sequence[int] | None = None,
    prob: float = 0.8,
    rotate_deg: float = 30.0,
    shift: float = 0.2,
    scale: float = 0.2,
    device: str | torch.device | None = None,
) -> list:
    """Wong & Moradi 2.4: with probability `prob`, one random affine of axial rotation +-rotate_deg,
    shift +-shift of the size, and one scaling factor 1 +- scale for all axes; labels use nearest-neighbour
    interpolation, images are padded with their minimum (PaperRandAffined).

    The axial plane is the first two spatial axes of a RAS volume, i.e. a rotation about the last axis.
    `device`: where the sampling grid is built and applied (trainer.augment_on_device passes the training
    device); None keeps MONAI's default (CPU grid, resampled on the input's device).
    """
    angle = math.radians(rotate_deg)
    rotate = (angle,) if spatial_dims == 2 else (0.0, 0.0, angle)
    translate = [shift * s for s in shape] if shape else None
    return [
        PaperRandAffined(
            keys=KEYS,
            prob=prob,
            rotate_range=rotate,
            translate_range=translate,
            scale_range=[scale] * spatial_dims,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            device=torch.device(device) if device is not None else None,
        )
    ]


def no_augmentation(spatial_dims: int, shape: Sequence[int] | None = None) -> list:
    """No random transform: every epoch sees the preprocessed cases as they are."""
    return []
