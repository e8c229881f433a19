"""Synthetic multi-label volumes for demos and tests (docs/design.md §8), generated from a seed.

Each case is a noisy image of nested ellipsoids and blobs whose labels have very different sizes, like the
brain structures of Wong & Moradi Table 1a: two large structures (tens of % of the volume), a medium one
and progressively smaller ones down to a few dozen voxels (radius >= 2 voxels, up to three blobs each).
Every class has its own mean intensity, with
per-case contrast jitter, a smooth bias field and Gaussian noise, so the task is learnable in minutes on a
CPU but not by thresholding alone. Cases are written once as NIfTI (imagesTr/labelsTr, dataset.json) under
`root`, keyed by the generation settings, and read back through the same loaders as real data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from medexp.data import cache_io
from medexp.data.base import DatasetInfo
from medexp.data.reading import inspect_cases
from medexp.data.records import CaseReport
from medexp.errors import DataError

SIZE_NAMES = ("large", "large", "medium", "small", "tiny")
GENERATOR_VERSION = 3  # part of the cache key: bump when make_case changes


def label_names(num_classes: int) -> list[str]:
    """background, large1, large2, medium3, small4, tiny5, tiny6, ..."""
    names = ["background"]
    for k in range(1, num_classes):
        names.append(f"{SIZE_NAMES[min(k - 1, len(SIZE_NAMES) - 1)]}{k}")
    return names


def _ellipsoid(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean mask of the ellipsoid sum(((x - c) / r)^2) <= 1 over a coordinate grid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def make_case(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int, noise: float):
    """One synthetic (image, label) pair.

    Returns:
        image float32 array of `shape`, label uint8 array of `shape` with values 0..num_classes-1.
    """
    size = np.array(shape, dtype=float)
    grid = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    label = np.zeros(shape, dtype=np.uint8)
    outer_c = size / 2 + rng.uniform(-0.05, 0.05, len(shape)) * size
    outer_r = size * rng.uniform(0.36, 0.44, len(shape))
    label[_ellipsoid(grid, outer_c, outer_r)] = 1
    if num_classes > 2:
        inner_r = outer_r * rng.uniform(0.55, 0.65, len(shape))
        label[_ellipsoid(grid, outer_c + rng.uniform(-0.05, 0.05, len(shape)) * size, inner_r)] = 2
    # Smaller structures: radii shrink geometrically from ~11% of the volume side, to no less than 2 voxels;
    # the smaller a structure, the more blobs it has (medium 1, small 2, tiny 3), like paired brain nuclei.
    for k in range(3, num_classes):
        for _ in range(min(k - 2, 3)):
            radius = size.min() * 0.11 * 0.8 ** (k - 3) * rng.uniform(0.9, 1.1, len(shape))
            radius = np.maximum(radius, 2.0)
            for _attempt in range(50):  # keep blobs apart: a blob may only cover the two large structures
                offset = rng.uniform(-1, 1, len(shape))
                offset *= rng.uniform(0.2, 0.7) / np.linalg.norm(offset)
                blob = _ellipsoid(grid, outer_c + offset * (outer_r - radius), radius * 1.5)
                if (label[blob] <= 2).all():
                    break
            label[_ellipsoid(grid, outer_c + offset * (outer_r - radius), radius)] = k
    # Class means 1.0 apart (background 0; noise 0.15 by default), interleaved so that nested structures
    # differ in contrast; a weak smooth bias field (+-9%).
    means = np.arange(num_classes) * rng.uniform(0.95, 1.05)
    means[1:] = means[1:][_class_order(num_classes - 1)]
    bias = 1.0 + 0.03 * sum(
        np.sin(g / s * np.pi * rng.uniform(0.5, 1.5)) for g, s in zip(grid, size, strict=True)
    )
    image = means[label] * bias + rng.normal(0.0, noise, shape)
    return image.astype(np.float32), label


def _class_order(n: int) -> np.ndarray:
    """A fixed interleaving of intensities so that neighbouring structures differ in contrast."""
    return np.argsort(np.arange(n) * 7 % max(n, 1), kind="stable")


class DemoDataset:
    """Synthetic dataset, written as NIfTI under root/demo-<key>/ on first use.

    Args:
        root: folder for generated data (one sub-folder per setting).
        num_cases: number of cases.
        num_classes: classes including background (>= 2).
        shape: spatial shape, 2 or 3 sizes.
        spatial_dims: 2 or 3; must match len(shape).
        noise: standard deviation of the Gaussian noise (class means lie in [0.25, 1]).
        seed: generation seed (independent of the training seed).
    """

    def __init__(
        self,
        root: str = "outputs/data",
        num_cases: int = 20,
        num_classes: int = 6,
        shape: list[int] = (32, 32, 32),
        spatial_dims: int = 3,
        noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        shape = [int(s) for s in shape]
        if len(shape) != spatial_dims:
            raise DataError(
                f"dataset.shape {shape} has {len(shape)} sizes but dataset.spatial_dims={spatial_dims}"
            )
        if num_classes < 2:
            raise DataError(f"dataset.num_classes must be >= 2, got {num_classes}")
        if min(shape) < 8:
            raise DataError(f"dataset.shape {shape}: every size must be >= 8")
        self.settings = dict(
            num_cases=num_cases,
            num_classes=num_classes,
            shape=shape,
            noise=noise,
            seed=seed,
            version=GENERATOR_VERSION,
        )
        key = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:10]
        self.folder = Path(root) / f"demo{spatial_dims}d-{key}"
        self.info = DatasetInfo(
            name=f"demo{spatial_dims}d",
            num_classes=num_classes,
            label_names=label_names(num_classes),
            in_channels=1,
            spatial_dims=spatial_dims,
            shape=shape,
            root=str(self.folder),
        )

    def prepare(self) -> list[dict]:
        """Generate the cases if they are not on disk yet; return [{"id", "image", "label"}]."""
        manifest = self.folder / "dataset.json"
        if not manifest.exists():
            self._generate()
        entries = json.loads(manifest.read_text())["training"]
        return [
            {"id": Path(e["label"]).name.split(".")[0], **{k: str(self.folder / e[k]) for k in e}}
            for e in entries
        ]

    def preprocess_image(self, image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The demo volumes are used as generated: an image comes back unchanged, on its own grid."""
        return image, affine

    def inspect(self) -> tuple[list[CaseReport], str]:
        """Read and check every generated case (`medexp data check`): (one report per case, the folder)."""
        return inspect_cases(self.prepare(), self.info.num_classes), str(self.folder)

    def _make_case(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (image, label) pair; subclasses with another generator override this (and `affine`)."""
        settings = self.settings
        return make_case(rng, tuple(settings["shape"]), settings["num_classes"], settings["noise"])

    affine = np.eye(4)  # voxel-to-world of the written volumes: 1 mm voxels

    def _generate(self) -> None:
        """Write the cases and dataset.json (last) into a private temp folder, then rename it into place: a
        kill leaves no half-made dataset, only a temp folder that a later run removes, and of parallel jobs
        generating the same data the first complete folder wins."""
        for stale in self.folder.parent.glob(f".{self.folder.name}.*.tmp"):
            if cache_io.is_stale(stale):
                shutil.rmtree(stale, ignore_errors=True)
        work = cache_io.temp_path(self.folder)
        shutil.rmtree(work, ignore_errors=True)
        try:
            self._write_cases(work)
        except OSError as err:
            shutil.rmtree(work, ignore_errors=True)
            raise cache_io.write_failed(self.folder, err) from err
        for _attempt in range(2):
            try:
                os.rename(work, self.folder)
                return
            except OSError:
                if (self.folder / "dataset.json").exists():  # a parallel job finished first
                    shutil.rmtree(work, ignore_errors=True)
                    return
                shutil.rmtree(self.folder, ignore_errors=True)  # half-made by an older medexp: replaced
        raise DataError(f"{self.folder}: cannot move the generated data into place")

    def _write_cases(self, folder: Path) -> None:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        affine = self.affine
        entries = []
        for i in range(self.settings["num_cases"]):
            rng = np.random.default_rng([self.settings["seed"], i])
            image, label = self._make_case(rng)
            name = f"case_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / name)
            entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        manifest = {
            "name": self.info.name,
            "labels": {str(k): n for k, n in enumerate(self.info.label_names)},
            "modality": {"0": getattr(self, "modality", "synthetic")},
            "training": entries,
            "settings": self.settings,
        }
        (folder / "dataset.json").write_text(json.dumps(manifest, indent=1))  # last: the folder is complete
