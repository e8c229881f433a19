"""What is wrong with a case, and `medexp data check`: one table of every case and all its problems.

A problem is one line "<file>: <what is wrong>". The same checks run inside `NiftiDataset.prepare()` (which
stops a training run before MLflow starts) and in `medexp data check`, which lists the problems of every case
at once and exits 0 only when every case is usable.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medexp.data.images2d import is_2d_file, read_2d

if TYPE_CHECKING:
    from medexp.data.layout import CaseFiles


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


def image_problems(name: str, image: np.ndarray) -> list[str]:
    """Voxel-level problems of an image array (any shape): NaN or infinite voxels."""
    problems = []
    if np.issubdtype(image.dtype, np.floating):
        nan = int(np.isnan(image).sum())
        inf = int(np.isinf(image).sum())
        if nan:
            problems.append(f"{name}: {nan} NaN voxel(s)")
        if inf:
            problems.append(f"{name}: {inf} infinite voxel(s)")
    return problems


def label_values(name: str, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Distinct values of a label map and each voxel's index into them.

    Returns:
        (values (V,), inverse (same shape as label) indexing `values`, problems): non-integer or NaN
        values are problems, since a label map holds class numbers.
    """
    values, inverse = np.unique(label, return_inverse=True)
    problems = []
    if np.issubdtype(values.dtype, np.floating):
        bad = values[~np.isfinite(values) | (np.round(values) != values)]
        if bad.size:
            shown = ", ".join(f"{v:g}" for v in bad[:5])
            problems.append(f"{name}: non-integer label values ({shown}{', ...' if bad.size > 5 else ''})")
    return values, inverse.reshape(label.shape), problems


def outside_labels(name: str, values: list[float], listed: dict[int, int], where: str) -> list[str]:
    """A problem if the label file holds values that `listed` (value -> class) does not map."""
    extra = sorted({int(v) for v in values if np.isfinite(v)} - set(listed))
    if not extra:
        return []
    allowed = ", ".join(str(v) for v in sorted(listed))
    return [
        f"{name}: label values {', '.join(map(str, extra))} not in {where} ({allowed}); "
        "set dataset.labels, or dataset.unlisted_labels=background to map them to background"
    ]


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


def read_case(case: CaseFiles, root: Path, channels_4d: int = 1) -> CaseData:
    """Read and check every file of a case; all problems go into the report, none raises.

    Args:
        case: its image file(s) and label map.
        root: the data folder (problems name files relative to it).
        channels_4d: channels a single 4D image may hold (MSD modalities); 1 means 4D images are a problem.
    """
    names = [_relative(p, root) for p in [*case.images, case.label]]
    report = CaseReport(case.id, files=names)
    allow = channels_4d if len(case.images) == 1 else 1
    images = [_load(p, n, report, allow) for p, n in zip(case.images, names, strict=False)]
    label = _load(case.label, names[-1], report, 0)
    ok = [x for x in images if x is not None]
    if ok:
        report.shape, report.spacing = list(ok[0][0].shape[1:]), ok[0][2]
        report.channels = sum(x[0].shape[0] for x in ok)
        for x, n in zip(images[1:], names[1:], strict=False):
            if x is not None and x[0].shape[1:] != ok[0][0].shape[1:]:
                report.problems.append(
                    f"{n}: shape {_fmt(x[0].shape[1:])} differs from {names[0]} {_fmt(report.shape)}"
                )
    if label is not None:
        values, inverse, problems = label_values(names[-1], label[0])
        report.values = [float(v) for v in values]
        report.problems += problems
        if ok and label[0].shape != ok[0][0].shape[1:]:
            shapes = f"{_fmt(label[0].shape)} differs from image {names[0]} {_fmt(report.shape)}"
            report.problems.append(f"{names[-1]}: shape {shapes}")
    data = CaseData(report, is_2d=is_2d_file(case.images[0]))
    if ok and label is not None and not report.problems and len(ok) == len(images):
        data.image = np.concatenate([x[0] for x in ok]) if len(ok) > 1 else ok[0][0]  # (C, *spatial)
        data.values, data.inverse, data.affine = report.values, inverse.astype(np.int32), ok[0][1]
        data.original = {
            "files": names,
            "shape": report.shape,
            "channels": report.channels,
            "affine": data.affine.tolist(),
            "spacing": report.spacing,
            "dtype": ok[0][3],
        }
    return data


def _load(path: Path, name: str, report: CaseReport, channels: int):
    """(array, affine, spacing, dtype) of one file, or None with the problems added to `report`.

    Images (channels >= 1) come back as (C, *spatial) float32; labels (channels=0) as (*spatial) in their
    stored type. A NIfTI holds 3 spatial axes (2D files: 2); trailing axes of size 1 are dropped.
    """
    try:
        if is_2d_file(path):
            array, affine, spacing = read_2d(path), np.eye(4), [1.0, 1.0]
            array = array if array.ndim == 2 else np.moveaxis(array, -1, 0)  # (W, H) or (bands, W, H)
            if channels == 0 and array.ndim == 3:
                if not (array == array[:1]).all():
                    report.problems.append(
                        f"{name}: colour label mask; expected grey levels (one class value per pixel)"
                    )
                    return None
                array = array[0]
            elif channels and array.ndim == 2:
                array = array[None]
            return array, affine, spacing, "uint8"
        return _load_nifti(path, name, report, channels)
    except Exception as err:  # any failure to read is a problem of this file, reported with the others
        why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        broken = isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)) or _broken_gzip(path)
        kind = "truncated or corrupt file" if broken else "unreadable"
        report.problems.append(f"{name}: cannot read ({kind}: {why})")
        return None


def _broken_gzip(path: Path) -> bool:
    """True if `path` is a .gz file that does not decompress to its end (truncated or corrupt)."""
    if not str(path).endswith(".gz"):
        return False
    try:
        with gzip.open(path) as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error):
        return True
    return False


def _load_nifti(path: Path, name: str, report: CaseReport, channels: int):
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4 and channels > 1 and shape[3] != channels:
        report.problems.append(
            f"{name}: {shape[3]} channels in a 4D image, dataset.json lists {channels} modalities"
        )
        return None
    if len(shape) > 3 and not (len(shape) == 4 and channels > 1):
        what = "label map" if channels == 0 else "image"
        hint = "" if channels == 0 else " (multi-modal cases: one file per modality, <case>_0000.nii.gz, ...)"
        report.problems.append(f"{name}: {len(shape)}D {what} ({_fmt(shape)}) where 3D is expected{hint}")
        return None
    array = np.asanyarray(img.dataobj).reshape(shape)
    report.problems += image_problems(name, array)
    spacing = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - min(3, len(shape)))
    if array.ndim == 2:
        array = array[..., None]  # a 2D NIfTI is one slice: (X, Y, 1)
    if channels:
        array = np.moveaxis(array, 3, 0) if array.ndim == 4 else array[None]  # (C, X, Y, Z)
        array = array.astype(np.float32, copy=False)
    return array, np.asarray(img.affine, dtype=np.float64), spacing[:3], str(img.get_data_dtype())


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _fmt(values: list, digits: int | None = None, sep: str = "x") -> str:
    if not values:
        return "-"
    return sep.join(f"{v:.{digits}f}" if digits is not None else f"{v:g}" for v in values)


def render(reports: list[CaseReport], title: str):
    """A rich Table: case, files, shape, spacing, label values found, problems (one row per case)."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in ("case", "shape", "spacing (mm)", "label values", "problems"):
        table.add_column(column, overflow="fold")
    for r in reports:
        shape = (f"{r.channels}ch " if r.channels > 1 else "") + _fmt(r.shape)
        problems = "\n".join(r.problems) if r.problems else "[green]ok[/green]"
        table.add_row(r.id, shape, _fmt(r.spacing, 2), _fmt(r.values, sep=", "), problems)
    return table


def run_check(overrides: list[str]) -> int:
    """`medexp data check [overrides]`: read every case of the composed dataset, print one table.

    Args:
        overrides: Hydra overrides as for `medexp train` (e.g. ["dataset=nifti", "dataset.root=/data"]).

    Returns:
        0 if every case is usable, else 1.

    Raises:
        ConfigError, DataError: user errors that stop the check itself (bad key, missing folder, no cases).
    """
    from rich.console import Console

    from medexp import build
    from medexp.config import validate
    from medexp.overrides import compose_config

    cfg = compose_config(list(overrides))
    validate(cfg)
    dataset = build.build_dataset(cfg)
    if hasattr(dataset, "inspect"):
        reports, where = dataset.inspect()
    else:  # any other dataset: read the NIfTI files its prepare() lists
        from medexp.data.nifti import inspect_cases

        cases = dataset.prepare()
        reports, where = inspect_cases(cases, dataset.info.num_classes), dataset.info.root
    bad = [r for r in reports if r.problems]
    console = Console(width=max(Console().width, 120))
    console.print(render(reports, f"{len(reports)} case(s) in {where}"))
    if bad:
        n_problems = sum(len(r.problems) for r in bad)
        console.print(f"[red]{n_problems} problem(s) in {len(bad)} of {len(reports)} row(s)[/red]")
        return 1
    console.print(f"[green]all {len(reports)} case(s) usable[/green]")
    return 0
