"""Size guards: how many voxels a file holds and how many its preprocessing makes, from the header alone,
checked against `dataset.max_voxels` before any voxel is read or any array allocated.

A NIfTI header (348 bytes, at the start of the file, so a .nii.gz gives it after decompressing its first
block) states the array shape and voxel size; NRRD and MetaImage headers are text with the same facts.
Reading the header only is what keeps a small .nii.gz that inflates to 1100^3 voxels, or a 16^3 volume of
100 mm voxels that resampling to 1 mm would turn into 1600^3, from being allocated at all.

The default limit, 2^28 voxels (1 GiB as float32), admits a 512 x 512 x 300 CT as stored (78.6M voxels),
and with 1 mm voxels kept at 1 mm and zero-padded to a cube for a cubic dataset.shape (512^3 = 134M);
docs/design.md §8.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medexp.errors import ConfigError

DEFAULT_MAX_VOXELS = 2**28
WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}  # axis code -> world axis


@dataclass
class Header:
    """What a file's header says: the array shape as stored (all axes), the voxel size of its spatial axes
    and the world axis (0, 1, 2) each spatial axis runs along (None when the header has no directions)."""

    shape: tuple[int, ...]
    spacing: list[float]
    world_axes: list[int] | None = None

    @property
    def voxels(self) -> int:
        return math.prod(int(s) for s in self.shape)


def check_max_voxels(value) -> int:
    """`dataset.max_voxels` as an int, or a ConfigError naming the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dataset.max_voxels={value}: expected a positive number of voxels")
    return value


def read_header(path: Path) -> Header | None:
    """The header of a volume or 2D image file without its voxels; None if the header cannot be parsed
    (the reader then reports the file as unreadable)."""
    low = str(path).lower()
    try:
        if low.endswith((".nii", ".nii.gz")):
            return _nifti(path)
        if low.endswith((".nrrd", ".nhdr")):
            return _nrrd(path)
        if low.endswith((".mha", ".mhd")):
            return _metaimage(path)
        from PIL import Image

        with Image.open(path) as image:  # PIL reads the size from the header; decoding waits for .load()
            return Header((image.size[0], image.size[1], len(image.getbands())), [1.0, 1.0])
    except Exception:  # noqa: BLE001 - an unparseable header is the reader's problem to report
        return None


def _nifti(path: Path) -> Header:
    import nibabel as nib

    image = nib.load(str(path))  # header only: the voxels stay on disk until asked for
    shape = tuple(int(s) for s in image.header.get_data_shape())
    spatial = min(3, len(shape))
    zooms = [float(z) for z in image.header.get_zooms()[:spatial]]
    axes = nib.orientations.io_orientation(image.affine)[:spatial, 0]
    return Header(shape, zooms, None if np.isnan(axes).any() else [int(a) for a in axes])


def _nrrd(path: Path) -> Header:
    import nrrd

    header = nrrd.read_header(str(path))
    shape = tuple(int(s) for s in header["sizes"])
    directions = header.get("space directions")
    if directions is None:
        return Header(shape, [float(s) for s in header.get("spacings", [1.0] * len(shape))])
    rows = [np.asarray(d, dtype=float) for d in directions if d is not None and np.all(np.isfinite(d))]
    spacing = [float(np.linalg.norm(d)) for d in rows]
    return Header(shape, spacing, [int(np.abs(d).argmax()) for d in rows])


def _metaimage(path: Path) -> Header:
    """MetaImage (.mha/.mhd): `Key = value` text lines up to ElementDataFile."""
    fields = {}
    with open(path, "rb") as f:
        for raw in f.read(1 << 16).split(b"\n"):
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    shape = tuple(int(s) for s in fields["DimSize"].split())
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    spacing = [float(s) for s in re.split(r"\s+", fields.get("ElementSpacing", "")) if s] or [1.0] * len(
        shape
    )
    return Header(shape + ((channels,) if channels > 1 else ()), spacing)


def resampled_shape(header: Header, spacing: list[float] | None, orientation: str | None) -> list[int]:
    """The spatial grid of this file after reorientation and resampling to `spacing` (an axis of -1 keeps
    its size), as MONAI's Spacing makes it: the distance between the first and last voxel centres,
    (n - 1) * old / new, plus one voxel; rounded up here, so the estimate is never smaller (at most one
    voxel larger per axis)."""
    dims = len(spacing) if spacing is not None else min(3, len(header.shape))
    sizes, zooms = list(header.shape[:dims]), list(header.spacing[:dims])
    if orientation and dims == 3 and header.world_axes is not None and len(set(header.world_axes)) == 3:
        order = [header.world_axes.index(WORLD_AXIS[c]) for c in str(orientation).upper()]
        sizes, zooms = [sizes[i] for i in order], [zooms[i] for i in order]
    if spacing is None:
        return sizes
    new = zip(sizes, zooms, spacing, strict=True)
    return [n if t is None or t <= 0 else math.ceil((n - 1) * z / t - 1e-6) + 1 for n, z, t in new]


def preprocessed_shape(
    header: Header,
    spacing: list[float] | None,
    orientation: str | None,
    target: list[int],
    fit: str,
) -> list[int]:
    """The largest spatial grid preprocessing makes of this file (medexp.data.transforms.preprocess_case):
    `resampled_shape`, zero-padded to the aspect ratio of `target` with fit=pad_resize."""
    from medexp.data.transforms import padded_size

    sizes = resampled_shape(header, spacing, orientation)
    if len(sizes) != len(target):
        return sizes
    if fit == "pad_resize":
        sizes = [max(a, b) for a, b in zip(sizes, padded_size(sizes, target), strict=True)]
    return sizes


def too_large(name: str, shape, voxels: int, limit: int, what: str, hint: str = "") -> str | None:
    """The one-line problem of a file over the limit (`what`: which size), or None."""
    if voxels <= limit:
        return None
    shown = "x".join(str(int(s)) for s in shape)
    return (
        f"{name}: {what} {shown} = {voxels:,} voxels, over dataset.max_voxels={limit:,}; "
        f"raise dataset.max_voxels if the memory is there{hint}"
    )


def stored_problem(path: Path, name: str, limit: int) -> str | None:
    """The problem of a file whose header states more voxels than `limit` (nothing else is read)."""
    header = read_header(path)
    if header is None:
        return None
    return too_large(name, header.shape, header.voxels, limit, "header size")
