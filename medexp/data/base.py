"""What every dataset provides: its cases on disk and a description of them."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(Exception):
    """A problem with the user's data: reported as one line, no traceback."""


@dataclass
class DatasetInfo:
    """Description of a prepared dataset.

    Attributes:
        name: short name used in tags and cache keys.
        num_classes: classes including background.
        label_names: one name per class, background first; used in metric names.
        in_channels: image channels (modalities).
        spatial_dims: 2 or 3.
        shape: spatial shape every case has after preprocessing.
        root: folder that holds the cases, the splits file and the cache.
        spacing: voxel spacing in mm after preprocessing.
        channel_names: one name per input channel (modality), if known.
    """

    name: str
    num_classes: int
    label_names: list[str]
    in_channels: int
    spatial_dims: int
    shape: list[int]
    root: str
    spacing: list[float] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.label_names) != self.num_classes:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_classes} classes")
        if not self.spacing:
            self.spacing = [1.0] * self.spatial_dims
