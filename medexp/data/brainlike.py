"""`dataset=brainlike`: synthetic T1-weighted head volumes with the 19 labels of Wong & Moradi Table 1a.

The paper segments 19 brain structures whose average sizes (Table 1a, % of the labelled volume) span three
orders of magnitude, from the cerebral grey matter (50.24%) down to the accumbens (0.07%). This generator
draws each structure as one ellipsoid, or a left/right pair of them, placed where it lies in a brain (RAS
axes: x left-right, y posterior-anterior, z inferior-superior) and sized so that the average fractions
follow Table 1a (`TABLE_1A`; tests/test_brainlike.py checks them), nested as in a brain:

- the cerebrum: a cortical grey shell around the cerebral white matter, both with a folded (wobbling)
  surface, holding the lateral ventricles, caudate, putamen, pallidum, accumbens, thalamus and the third
  ventricle between the thalami, and the hippocampus, amygdala and inferior lateral ventricles;
- the cerebellum (grey around white, the three vermal lobule groups in its midline), the fourth ventricle
  in front of it and the brainstem;
- outside the brain, background (label 0) tissue: CSF, skull and scalp.

Intensities follow T1-weighted contrast: white matter brightest, deep grey nuclei between white and grey
(pallidum and thalamus brighter than caudate and putamen), cortical grey darker, CSF and ventricles dark,
skull dark and scalp bright. Several labels share nearly the grey-matter intensity (hippocampus, amygdala,
the vermal lobules) and differ only in position and shape, as in real images. Every case has its own
pose (scaling 0.92-1.08 per axis, rotation up to 6 degrees about z and 4 about x, a shift of up to 3%),
jittered structure positions and sizes, folded surfaces of random phase, per-tissue contrast, a smooth
bias field (+-8%), partial-volume blur and Gaussian noise. Case i comes from the seed pair (seed, i).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from medexp.data.base import DatasetInfo
from medexp.data.demo import DemoDataset
from medexp.errors import DataError

GENERATOR_VERSION = 1  # part of the cache key: bump when make_brain changes

# Table 1a of Wong & Moradi: label number -> (name, average relative size in % of the labelled volume).
TABLE_1A = {
    1: ("cerebral_grey", 50.24),
    2: ("3rd_ventricle", 0.09),
    3: ("4th_ventricle", 0.15),
    4: ("brainstem", 1.46),
    5: ("cvl_1_5", 0.39),
    6: ("cvl_6_7", 0.19),
    7: ("cvl_8_10", 0.26),
    8: ("accumbens", 0.07),
    9: ("amygdala", 0.21),
    10: ("caudate", 0.54),
    11: ("cerebellar_grey", 8.19),
    12: ("cerebellar_white", 2.06),
    13: ("cerebral_white", 31.23),
    14: ("hippocampus", 0.58),
    15: ("inf_lateral_vent", 0.09),
    16: ("lateral_ventricle", 2.11),
    17: ("pallidum", 0.25),
    18: ("putamen", 0.73),
    19: ("thalamus", 1.19),
}
LABEL_NAMES = ["background", *(TABLE_1A[k][0] for k in sorted(TABLE_1A))]

# Parts in painting order (a later part overwrites an earlier one): (label, centre, semi-axes, paired,
# wobble). Coordinates in the brain frame, [-1, 1] per axis of the volume; `paired` mirrors the part
# across x = 0 (left and right); `wobble` is the relative amplitude of the folded surface.
PARTS = (
    (1, (0.0, 0.02, 0.16), (0.80, 0.85, 0.64), False, 0.05),  # cerebrum, as grey matter
    (13, (0.0, 0.02, 0.17), (0.598, 0.636, 0.472), False, 0.07),  # cerebral white matter inside it
    (11, (0.0, -0.50, -0.46), (0.597, 0.346, 0.303), False, 0.04),  # cerebellum, as grey matter
    (12, (0.0, -0.50, -0.45), (0.351, 0.203, 0.171), False, 0.06),  # cerebellar white matter
    (4, (0.0, -0.12, -0.50), (0.138, 0.148, 0.356), False, 0.0),  # brainstem
    (5, (0.0, -0.38, -0.31), (0.127, 0.140, 0.140), False, 0.0),  # vermal lobules I-V
    (6, (0.0, -0.64, -0.34), (0.089, 0.102, 0.102), False, 0.0),  # vermal lobules VI-VII
    (7, (0.0, -0.58, -0.58), (0.092, 0.118, 0.118), False, 0.0),  # vermal lobules VIII-X
    (3, (0.0, -0.28, -0.42), (0.083, 0.069, 0.125), False, 0.0),  # fourth ventricle
    (19, (0.11, -0.14, 0.04), (0.114, 0.187, 0.146), True, 0.0),  # thalamus
    (2, (0.0, -0.12, 0.04), (0.035, 0.128, 0.099), False, 0.0),  # third ventricle, between the thalami
    (18, (0.36, 0.06, 0.06), (0.07, 0.202, 0.131), True, 0.0),  # putamen
    (17, (0.27, 0.02, 0.04), (0.054, 0.118, 0.097), True, 0.0),  # pallidum, medial to the putamen
    (10, (0.24, 0.20, 0.24), (0.057, 0.161, 0.143), True, 0.0),  # caudate
    (8, (0.15, 0.26, -0.04), (0.053, 0.063, 0.053), True, 0.0),  # accumbens
    (16, (0.12, 0.02, 0.28), (0.083, 0.42, 0.146), True, 0.0),  # lateral ventricles
    (14, (0.34, -0.20, -0.16), (0.072, 0.245, 0.082), True, 0.0),  # hippocampus
    (9, (0.34, 0.08, -0.18), (0.076, 0.087, 0.076), True, 0.0),  # amygdala
    (15, (0.40, -0.18, -0.09), (0.033, 0.177, 0.038), True, 0.0),  # inferior lateral ventricle
)

# T1-weighted intensity per label (0..1); background tissues below.
INTENSITY = {
    1: 0.55, 2: 0.18, 3: 0.18, 4: 0.78, 5: 0.58, 6: 0.56, 7: 0.60, 8: 0.60, 9: 0.59, 10: 0.62,
    11: 0.55, 12: 0.82, 13: 0.85, 14: 0.57, 15: 0.20, 16: 0.18, 17: 0.74, 18: 0.64, 19: 0.70,
}  # fmt: skip
HEAD = (0.0, 0.0, -0.02), (0.94, 0.98, 0.96)  # outer surface of the scalp (centre, semi-axes)
ZOOM = 1.08  # the brain frame magnified in the volume: a tight field of view (scalp cut at the edges),
# so the brain fills ~34% of the volume and the smallest structures get as many voxels as they can
SCALP, SKULL, CSF = 0.65, 0.12, 0.20  # scalp outside 0.95 of HEAD, skull 0.91-0.95, CSF inside


def _unit_grid(shape: tuple[int, ...]) -> np.ndarray:
    """(3, *shape) voxel-centre coordinates in [-1, 1] per axis."""
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0 for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _pose(rng: np.random.Generator, grid: np.ndarray, jitter: bool) -> np.ndarray:
    """The grid in the brain frame of one case: p = R^T (x - t) / s for its scaling s, rotation R
    (about z, then x) and shift t."""
    grid = grid / ZOOM
    if not jitter:
        return grid
    scale = rng.uniform(0.92, 1.08, 3)
    yaw, roll = np.radians(rng.uniform(-6, 6)), np.radians(rng.uniform(-4, 4))
    rot_z = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(roll), -np.sin(roll)], [0, np.sin(roll), np.cos(roll)]])
    rotation = rot_z @ rot_x
    shift = rng.uniform(-0.03, 0.03, 3)
    moved = grid - shift[:, None, None, None]
    return (np.einsum("ji,j...->i...", rotation, moved) / scale[:, None, None, None]).astype(np.float32)


def _folds(rng: np.random.Generator, p: np.ndarray, amplitude: float) -> np.ndarray | float:
    """1 + amplitude * (a sum of three low-frequency plane waves of random direction and phase): the
    radius factor of a folded surface."""
    if amplitude == 0:
        return 1.0
    wave = 0.0
    for _ in range(3):
        direction = rng.normal(size=3)
        direction *= rng.uniform(4.0, 7.0) / np.linalg.norm(direction)  # 4-7 radians per unit length
        wave = wave + np.sin(np.tensordot(direction, p, axes=1) + rng.uniform(0, 2 * np.pi))
    return 1.0 + amplitude * wave / 3.0


def _ellipsoid(p: np.ndarray, centre, radii, factor=1.0) -> np.ndarray:
    """Mask of sum(((p - c) / r)^2) <= factor^2 over the (3, *shape) coordinates p."""
    c = np.asarray(centre, np.float32)[:, None, None, None]
    r = np.asarray(radii, np.float32)[:, None, None, None]
    return (((p - c) / r) ** 2).sum(axis=0) <= np.square(factor)


def make_brain(
    rng: np.random.Generator, shape: tuple[int, int, int], noise: float = 0.03, jitter: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic head: (T1-like float32 image, uint8 label map with values 0..19) of `shape`.

    Args:
        rng: the case's random generator.
        shape: three sizes.
        noise: standard deviation of the Gaussian noise (intensities lie in [0, 1]).
        jitter: per-case pose, sizes, folds and contrast; False draws the mean brain (calibration).
    """
    grid = _unit_grid(shape)
    p = _pose(rng, grid, jitter)
    label = np.zeros(shape, dtype=np.uint8)
    image = np.zeros(shape, dtype=np.float32)
    head_c, head_r = HEAD
    image[_ellipsoid(p, head_c, head_r)] = SCALP
    image[_ellipsoid(p, head_c, head_r, 0.95)] = SKULL
    image[_ellipsoid(p, head_c, head_r, 0.91)] = CSF
    gain = rng.uniform(0.9, 1.1) if jitter else 1.0
    contrast = {k: v * gain + (rng.normal(0, 0.015) if jitter else 0.0) for k, v in INTENSITY.items()}
    for k, centre, radii, paired, wobble in PARTS:
        for side in (1.0, -1.0) if paired else (1.0,):
            c = np.array(centre) * (side, 1.0, 1.0)
            r = np.array(radii)
            if jitter:
                c = c + rng.normal(0, 0.012, 3)
                r = r * rng.uniform(0.92, 1.08)
            mask = _ellipsoid(p, c, r, _folds(rng, p, wobble) if jitter else 1.0)
            label[mask] = k
    for k, value in contrast.items():
        image[label == k] = value
    image = ndimage.gaussian_filter(image, sigma=0.5)  # partial volume at the borders
    if jitter:
        bias = 1.0 + 0.08 * np.sin(np.tensordot(rng.normal(0, 1.2, 3), grid, axes=1) + rng.uniform(0, 6.3))
        image = image * bias + rng.normal(0.0, noise, shape)
    return image.astype(np.float32), label


def label_fractions(label: np.ndarray) -> dict[int, float]:
    """{label: % of the labelled (non-background) voxels}, the measure of Table 1a."""
    counts = np.bincount(label.ravel(), minlength=20)[1:20]
    return {k: 100.0 * counts[k - 1] / max(counts.sum(), 1) for k in TABLE_1A}


class BrainlikeDataset(DemoDataset):
    """Synthetic brain MRI with the 19 labels of Wong & Moradi Table 1a, written as NIfTI under
    root/brainlike-<key>/ on first use (imagesTr/, labelsTr/, dataset.json), read like any dataset.

    Args:
        root: folder for generated data (one sub-folder per setting).
        num_cases: number of cases (the paper: 43).
        shape: three sizes, each divisible by 16 for the paper's network (the paper: 128^3).
        noise: standard deviation of the Gaussian noise.
        field_of_view: extent of the volume in mm (sets the voxel spacing, 200 / size by default).
        seed: generation seed (independent of the training seed).
    """

    modality = "T1w (synthetic)"

    def __init__(
        self,
        root: str = "outputs/data",
        num_cases: int = 20,
        shape: list[int] = (32, 32, 32),
        noise: float = 0.03,
        field_of_view: float = 200.0,
        seed: int = 0,
        spatial_dims: int = 3,
    ) -> None:
        shape = [int(s) for s in shape]
        if spatial_dims != 3 or len(shape) != 3:
            raise DataError(f"dataset.shape {shape}: the brain-like data are 3D (three sizes)")
        if min(shape) < 16:
            raise DataError(f"dataset.shape {shape}: every size must be >= 16")
        self.settings = dict(
            num_cases=int(num_cases), shape=shape, noise=float(noise), field_of_view=float(field_of_view),
            seed=int(seed), version=GENERATOR_VERSION,
        )  # fmt: skip
        key = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:10]
        self.folder = Path(root) / f"brainlike-{key}"
        spacing = [float(field_of_view) / n for n in shape]
        self.affine = np.diag([*spacing, 1.0])
        self.info = DatasetInfo(
            name="brainlike",
            num_classes=len(LABEL_NAMES),
            label_names=list(LABEL_NAMES),
            in_channels=1,
            spatial_dims=3,
            shape=shape,
            root=str(self.folder),
            spacing=spacing,
            channel_names=["T1w"],
        )

    def _make_case(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return make_brain(rng, tuple(self.settings["shape"]), self.settings["noise"])
