"""What a data folder is made of and what reading it found: plain records shared by the layout finder, the
reader and `medexp data check` (no I/O here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class CaseFiles:
    """The files of one case: one image per channel (or one 4D image) and a label map."""

    id: str
    images: list[Path]
    label: Path


@dataclass
class CaseReport:
    """What reading one case found.

    Attributes:
        id: case id (file name without suffix and channel suffix).
        files: image file(s) then label file, relative to the data folder.
        shape: spatial shape of the image as stored (before preprocessing).
        channels: image channels (modalities).
        spacing: voxel size in mm as stored.
        values: label values found in the label file.
        problems: one line per problem, "<file>: <problem>".
    """

    id: str
    files: list[str] = field(default_factory=list)
    shape: list[int] = field(default_factory=list)
    channels: int = 0
    spacing: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CaseReport:
        return cls(**d)


@dataclass
class CaseData:
    """One case as read from disk (arrays are None when the case has problems).

    Attributes:
        report: what was found, with all problems.
        image: (C, *spatial) float32, one channel per modality.
        values: distinct label values; inverse: (*spatial) index of each voxel's value in `values`.
        affine: (4, 4) voxel-to-world matrix of the (first) image; is_2d: read from a 2D image file.
        original: the stored header (files, shape, channels, affine, spacing, dtype), kept for predict.
    """

    report: CaseReport
    image: np.ndarray | None = None
    values: list[float] = field(default_factory=list)
    inverse: np.ndarray | None = None
    affine: np.ndarray | None = None
    is_2d: bool = False
    original: dict = field(default_factory=dict)


def fmt_values(values: list, digits: int | None = None, sep: str = "x") -> str:
    if not values:
        return "-"
    return sep.join(f"{v:.{digits}f}" if digits is not None else f"{v:g}" for v in values)
