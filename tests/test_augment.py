"""The paper's augmentation (Wong & Moradi 2.4) as medexp applies it: one scale factor for all axes, and the
uncovered border filled with the image's minimum. Each fix is checked against MONAI's plain RandAffined with
the same settings and seed (the control: it stretches axes apart and pads with 0)."""

from __future__ import annotations

import torch
from monai import transforms as mt

from medexp.data.augment import PaperRandAffined, random_affine

SIZE = 24


def _cube(size: int = SIZE, side: int = 10) -> dict:
    """A centred cube of ones (label 1) in a (1, s, s, s) volume of zeros."""
    label = torch.zeros(1, size, size, size)
    lo = (size - side) // 2
    label[:, lo : lo + side, lo : lo + side, lo : lo + side] = 1
    return {"image": label.clone(), "label": label}


def _extents(label: torch.Tensor) -> list[int]:
    """Voxels the foreground spans along each spatial axis of a (1, *spatial) map."""
    mask = label[0] > 0.5
    return [int(mask.any(dim=tuple(d for d in range(3) if d != axis)).sum()) for axis in range(3)]


def _scale_only(cls, seed: int):
    """Scaling 1 +- 0.4 only (no rotation or shift), so the cube's extents show the scale per axis."""
    t = cls(
        keys=["image", "label"], prob=1.0, scale_range=[0.4] * 3, mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )  # fmt: skip
    t.set_random_state(seed=seed)
    return t


def test_one_scale_factor_for_all_axes_where_monai_draws_one_per_axis():
    stretched = 0
    for seed in range(8):
        ours = _scale_only(PaperRandAffined, seed)
        out = ours(_cube())
        factors = ours.rand_affine.rand_affine_grid.scale_params
        assert len(set(factors)) == 1 and 0.6 <= factors[0] <= 1.4  # one draw in 1 +- 0.4
        extents = _extents(out["label"])
        assert max(extents) - min(extents) <= 1, extents  # a cube stays a cube (one voxel of rounding)
        control = _scale_only(mt.RandAffined, seed)(_cube())
        control_extents = _extents(control["label"])
        stretched += max(control_extents) - min(control_extents) > 1
    assert stretched >= 4  # the control: MONAI's per-axis draws stretch the cube for most seeds


def test_border_is_padded_with_the_image_minimum_not_zero():
    """A z-scored image (minimum -1.5): a shift uncovers a border, which must hold -1.5, the minimum,
    where MONAI's zero padding writes 0 (the mean intensity after z-scoring)."""
    image = torch.full((1, SIZE, SIZE, SIZE), -1.5)
    image[:, 6:18, 6:18, 6:18] = 2.0
    data = {"image": image, "label": (image > 0).float()}

    def shifted(cls):
        t = cls(
            keys=["image", "label"], prob=1.0, translate_range=[SIZE * 0.3] * 3,
            mode=("bilinear", "nearest"), padding_mode="zeros",
        )  # fmt: skip
        t.set_random_state(seed=1)
        return t(dict(data))

    ours, control = shifted(PaperRandAffined), shifted(mt.RandAffined)
    border = control["image"] == 0  # where the control padded (no voxel of the input is 0)
    assert border.sum() > 100
    torch.testing.assert_close(ours["image"][border], torch.full_like(ours["image"][border], -1.5))
    assert float(ours["image"].min()) >= -1.5 - 1e-5  # nothing below the minimum: padding, not a new value
    near = torch.nn.functional.max_pool3d(border.float()[None], 3, stride=1, padding=1)[0] > 0
    inside = ~near  # away from the border, where bilinear resampling blends in no padding value
    torch.testing.assert_close(ours["image"][inside], control["image"][inside], atol=1e-5, rtol=1e-5)
    assert torch.equal(ours["label"], control["label"])  # labels: background padding, same geometry


def test_random_affine_builds_the_paper_transform_with_per_channel_minimum():
    (t,) = random_affine(3, [SIZE] * 3, prob=1.0, rotate_deg=0.0, shift=0.3, scale=0.0)
    assert isinstance(t, PaperRandAffined)
    image = torch.stack([torch.full((SIZE, SIZE, SIZE), -2.0), torch.full((SIZE, SIZE, SIZE), 5.0)])
    image[:, 8:16, 8:16, 8:16] = 9.0
    t.set_random_state(seed=2)
    out = t({"image": image, "label": torch.zeros(1, SIZE, SIZE, SIZE)})
    assert float(out["image"][0].min()) == -2.0 and float(out["image"][1].min()) == 5.0
