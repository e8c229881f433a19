"""Random training augmentation, chosen by the `augment` config group (`_target_` + `_partial_`).

Each choice is a function (spatial_dims, shape, **settings) -> a list of MONAI dictionary transforms on
"image" and "label"; the runner supplies spatial_dims and the training shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai import transforms as mt

from medexp.data.transforms import KEYS


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
    shift +-shift of the size, and scaling 1 +- scale; labels use nearest-neighbour interpolation.

    The axial plane is the first two spatial axes of a RAS volume, i.e. a rotation about the last axis.
    `device`: where the sampling grid is built and applied (trainer.augment_on_device passes the training
    device); None keeps MONAI's default (CPU grid, resampled on the input's device).
    """
    angle = math.radians(rotate_deg)
    rotate = (angle,) if spatial_dims == 2 else (0.0, 0.0, angle)
    translate = [shift * s for s in shape] if shape else None
    return [
        mt.RandAffined(
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
