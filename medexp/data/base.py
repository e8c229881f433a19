"""What every dataset provides: its cases on disk and a description of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from medexp.data.labels import IGNORE_INDEX


@dataclass
class DatasetInfo:
    """Description of a prepared dataset; stored in checkpoints and MLflow models, so that a model can
    segment new images without the data (every field added later has a default: old checkpoints load).

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
        label_values: the label-file value each class is written as by `medexp predict`, background
            first (several values merged into one class write the smallest); empty = the class index.
        ignore_label: the label-file value of nnU-Net's `ignore` label (left out of losses and metrics),
            or None.
        channel_files: the file-name suffixes of the input channels in input order when a case is one
            file per channel ("0000", "0001" for nnU-Net; "t1", "flair" for `<case>_t1.nii.gz`); empty when
            a case is one file (3D, or 4D with all channels).
        source: the data folder the cases were read from (recorded with the MLflow run), if any.
        split_cases: {"train": [case id, ...], "val": [...], "test": [...]} of the run's split, recorded
            when it trained, so that `medexp evaluate` scores the cases the run was tested on even after
            cases were added to or removed from the data folder; empty for data not yet split.
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
    label_values: list[int] = field(default_factory=list)
    ignore_label: int | None = None
    channel_files: list[str] = field(default_factory=list)
    source: str = ""
    split_cases: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.label_names) != self.num_classes:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_classes} classes")
        if self.label_values and len(self.label_values) != self.num_classes:
            raise ValueError(f"{len(self.label_values)} label values for {self.num_classes} classes")
        if not self.spacing:
            self.spacing = [1.0] * self.spatial_dims

    @property
    def ignore_index(self) -> int | None:
        """The class value of ignored voxels in the preprocessed label maps (None: nothing is ignored); what
        losses (medexp.data.ignore) and evaluation (`evaluate(ignore_label=...)`) leave out."""
        return IGNORE_INDEX if self.ignore_label is not None else None

    def class_values(self) -> list[int]:
        """The label-file value of every class (class k is written as class_values()[k])."""
        return list(self.label_values) or list(range(self.num_classes))
