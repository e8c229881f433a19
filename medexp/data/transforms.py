"""MONAI transform pipelines: loading/preprocessing (deterministic, cacheable) and the paper's augmentation."""

from __future__ import annotations

import math

from monai import transforms as mt

KEYS = ("image", "label")


def load_transforms() -> list:
    """Read image and label files into channel-first float/int tensors."""
    return [
        mt.LoadImaged(keys=KEYS, image_only=True),
        mt.EnsureChannelFirstd(keys=KEYS),
        mt.EnsureTyped(keys="image", dtype="float32"),
        mt.EnsureTyped(keys="label", dtype="uint8"),
    ]


def paper_augmentation(
    spatial_dims: int,
    prob: float = 0.8,
    rotate_deg: float = 30.0,
    shift: float = 0.2,
    scale: float = 0.2,
    shape: list[int] | None = None,
) -> list:
    """Wong & Moradi 2.4: with probability `prob`, one random affine of axial rotation +-rotate_deg,
    shift +-shift of the size, and scaling 1 +- scale; labels use nearest-neighbour interpolation.

    The axial plane is the first two spatial axes of a RAS-ish volume, i.e. a rotation about the last axis.
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
        )
    ]
