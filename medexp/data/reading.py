"""Reading a case from disk and checking it: every problem of a file becomes one line "<file>: <what is
wrong>" in the case's report, and nothing raises. The same checks run inside `NiftiDataset.prepare()`
(which stops a training run before MLflow starts) and in `medexp data check`, which lists them all.

Files are read with MONAI's readers, chosen by file ending as nnU-Net's `file_ending` names them:
NibabelReader for .nii/.nii.gz, NrrdReader (pynrrd) for .nrrd/.nhdr, ITKReader for .mha/.mhd (needs the
`itk` extra) and PILReader for 2D images. All give arrays indexed (x, y, z) with a RAS voxel-to-world affine,
so the checks and the preprocessing are the same for every format.

Geometry: a label map must lie on its image's voxel grid, and the channel files of a case on each other's:
same shape, spacing (relative tolerance SPACING_RTOL), axis directions (DIRECTION_ATOL on the unit
direction vectors) and origin (ORIGIN_TOL voxels). A label map shifted, flipped or resampled against its
image is a problem naming the label file.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from medexp.data.images2d import is_2d_file, read_2d
from medexp.data.records import CaseData, CaseFiles, CaseReport, fmt_values
from medexp.data.sizes import DEFAULT_MAX_VOXELS, stored_problem
from medexp.errors import DataError

SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3  # on unit vectors: about 0.06 degrees
ORIGIN_TOL = 0.01  # in voxels of the reference file's smallest spacing
NIFTI_ENDINGS = (".nii.gz", ".nii")
NRRD_ENDINGS = (".nrrd", ".nhdr")
ITK_ENDINGS = (".mha", ".mhd")


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


def geometry_problems(name: str, affine: np.ndarray, ref_name: str, ref_affine: np.ndarray) -> list[str]:
    """Problems of a file whose voxel grid (affine) differs from the reference file's: spacing, axis
    directions (orientation) and origin, each within the module's tolerances."""
    a, r = np.asarray(affine, dtype=float), np.asarray(ref_affine, dtype=float)
    dims = min(3, a.shape[0] - 1)
    spacing_a, spacing_r = np.linalg.norm(a[:dims, :dims], axis=0), np.linalg.norm(r[:dims, :dims], axis=0)
    problems = []
    if not np.allclose(spacing_a, spacing_r, rtol=SPACING_RTOL, atol=0):
        problems.append(
            f"{name}: spacing {fmt_values(spacing_a.round(4).tolist())} mm differs from {ref_name} "
            f"{fmt_values(spacing_r.round(4).tolist())} mm"
        )
    directions_a = a[:dims, :dims] / np.maximum(spacing_a, 1e-12)
    directions_r = r[:dims, :dims] / np.maximum(spacing_r, 1e-12)
    if np.abs(directions_a - directions_r).max() > DIRECTION_ATOL:
        problems.append(f"{name}: {_orientation_change(a, r, ref_name)}")
    shift = float(np.linalg.norm(a[:dims, 3] - r[:dims, 3]))
    if shift > ORIGIN_TOL * float(spacing_r.min()):
        origin, ref_origin = (fmt_values(m[:dims, 3].round(2).tolist(), sep=", ") for m in (a, r))
        problems.append(f"{name}: origin ({origin}) mm is {shift:.3g} mm from {ref_name}'s ({ref_origin}) mm")
    return problems


def _orientation_change(a: np.ndarray, r: np.ndarray, ref_name: str) -> str:
    import nibabel as nib

    codes_a, codes_r = "".join(nib.aff2axcodes(a)), "".join(nib.aff2axcodes(r))
    if codes_a != codes_r:
        return f"orientation {codes_a} differs from {ref_name} {codes_r}"
    cosines = np.sum(a[:3, :3] * r[:3, :3], axis=0) / (
        np.linalg.norm(a[:3, :3], axis=0) * np.linalg.norm(r[:3, :3], axis=0)
    )
    angle = float(np.degrees(np.arccos(np.clip(cosines, -1, 1))).max())
    return f"axis directions differ from {ref_name} by up to {angle:.2f} degrees"


def read_case(
    case: CaseFiles, root: Path, channels_4d: int = 1, max_voxels: int = DEFAULT_MAX_VOXELS
) -> CaseData:
    """Read and check every file of a case; all problems go into the report, none raises.

    Args:
        case: its image file(s) and label map.
        root: the data folder (problems name files relative to it).
        channels_4d: channels a single 4D image may hold (MSD modalities); 1 means 4D images are a problem.
        max_voxels: a file whose header states more voxels is a problem, and is not read.
    """
    names = [_relative(p, root) for p in [*case.images, case.label]]
    report = CaseReport(case.id, files=names)
    allow = channels_4d if len(case.images) == 1 else 1
    images = [_load(p, n, report, allow, max_voxels) for p, n in zip(case.images, names, strict=False)]
    label = _load(case.label, names[-1], report, 0, max_voxels)
    ok = [x for x in images if x is not None]
    if ok:
        report.shape, report.spacing = list(ok[0][0].shape[1:]), ok[0][2]
        report.channels = sum(x[0].shape[0] for x in ok)
        for x, n in zip(images[1:], names[1:], strict=False):
            if x is None:
                continue
            if x[0].shape[1:] != ok[0][0].shape[1:]:
                shapes = f"{fmt_values(x[0].shape[1:])} differs from {names[0]} {fmt_values(report.shape)}"
                report.problems.append(f"{n}: shape {shapes}")
            else:
                report.problems += geometry_problems(n, x[1], names[0], ok[0][1])
    if label is not None:
        values, inverse, problems = label_values(names[-1], label[0])
        report.values = [float(v) for v in values]
        report.problems += problems
        if ok and label[0].shape != ok[0][0].shape[1:]:
            shapes = f"{fmt_values(label[0].shape)} differs from image {names[0]} {fmt_values(report.shape)}"
            report.problems.append(f"{names[-1]}: shape {shapes}")
        elif ok:
            report.problems += geometry_problems(names[-1], label[1], f"image {names[0]}", ok[0][1])
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


def read_images(
    paths: list[Path], channels: int, max_voxels: int = DEFAULT_MAX_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """The image of one case for inference: its channel files (or one 4D file) checked as in training.

    Args:
        paths: one file per channel, in input order, or one file holding `channels` channels.
        channels: the input channels the model takes.
        max_voxels: a file whose header states more voxels is refused before its voxels are read.

    Returns:
        (image (C, *spatial) float32, (4, 4) affine of the first file).

    Raises:
        DataError: the first problem, naming its file (unreadable, NaN voxels, channel count, shape or
            geometry differing between the channel files).
    """
    report = CaseReport(paths[0].name)
    names = [str(p) for p in paths]
    loaded = [
        _load(p, n, report, channels if len(paths) == 1 else 1, max_voxels)
        for p, n in zip(paths, names, strict=True)
    ]
    if not report.problems:
        for x, n in zip(loaded[1:], names[1:], strict=False):
            if x[0].shape[1:] != loaded[0][0].shape[1:]:
                first = fmt_values(loaded[0][0].shape[1:])
                shapes = f"{fmt_values(x[0].shape[1:])} differs from {names[0]} {first}"
                report.problems.append(f"{n}: shape {shapes}")
            else:
                report.problems += geometry_problems(n, x[1], names[0], loaded[0][1])
    if report.problems:
        raise DataError(report.problems[0])
    image = np.concatenate([x[0] for x in loaded]) if len(loaded) > 1 else loaded[0][0]  # (C, *spatial)
    if image.shape[0] != channels:
        expected = f"{channels} channel(s): one 4D file, or one file per channel"
        raise DataError(f"{names[0]}: {image.shape[0]} channel(s) where the model takes {expected}")
    return image, loaded[0][1]


def _load(path: Path, name: str, report: CaseReport, channels: int, max_voxels: int = DEFAULT_MAX_VOXELS):
    """(array, affine, spacing, dtype) of one file, or None with the problems added to `report`.

    Images (channels >= 1) come back as (C, *spatial) float32; labels (channels=0) as (*spatial) in their
    stored type. A volume holds 3 spatial axes (2D files: 2); trailing axes of size 1 are dropped. A header
    stating more than `max_voxels` voxels is a problem before anything else is read (a small .nii.gz may
    inflate to gigabytes: medexp.data.sizes).
    """
    too_large = stored_problem(path, name, max_voxels)
    if too_large:
        report.problems.append(too_large)
        return None
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
        return _load_volume(path, name, report, channels)
    except DataError as err:  # no reader for this file type
        report.problems.append(str(err))
        return None
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


def volume_reader(path: Path, name: str | None = None):
    """MONAI's reader for a volume file, by its ending (see the module docstring).

    Raises:
        DataError: an ITK format without the `itk` package, or an ending no reader takes.
    """
    from monai.data import ITKReader, NibabelReader, NrrdReader

    low = str(path).lower()
    if low.endswith(NIFTI_ENDINGS):
        return NibabelReader()
    if low.endswith(NRRD_ENDINGS):
        return NrrdReader(dtype=np.float64)  # exact for every stored integer type: label values stay exact
    if low.endswith(ITK_ENDINGS):
        if importlib.util.find_spec("itk") is None:
            raise DataError(
                f"{name or path}: reading {Path(low).suffix} files needs ITK: pip install 'medexp[itk]'"
            )
        return ITKReader()
    raise DataError(
        f"{name or path}: unsupported file type; expected "
        + ", ".join(NIFTI_ENDINGS + NRRD_ENDINGS + ITK_ENDINGS)
    )


def _load_volume(path: Path, name: str, report: CaseReport, channels: int):
    reader = volume_reader(path, name)
    array, meta = reader.get_data(reader.read(str(path)))
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    shape = array.shape
    if array.ndim == 4 and channels > 1 and shape[3] != channels:
        report.problems.append(
            f"{name}: {shape[3]} channels in a 4D image, dataset.json lists {channels} modalities"
        )
        return None
    if array.ndim > 3 and not (array.ndim == 4 and channels > 1):
        what = "label map" if channels == 0 else "image"
        hint = "" if channels == 0 else " (multi-modal cases: one file per modality, <case>_0000.nii.gz, ...)"
        report.problems.append(
            f"{name}: {array.ndim}D {what} ({fmt_values(shape)}) where 3D is expected{hint}"
        )
        return None
    report.problems += image_problems(name, array)
    affine = np.asarray(meta["affine"], dtype=np.float64)
    if affine.shape != (4, 4):  # a 2D volume file: embed its in-plane affine in 3D
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    spacing = np.linalg.norm(affine[:3, :3], axis=0).round(6).tolist()
    if array.ndim == 2:
        array = array[..., None]  # a 2D volume is one slice: (X, Y, 1)
    if channels:
        array = np.moveaxis(array, 3, 0) if array.ndim == 4 else array[None]  # (C, X, Y, Z)
        array = array.astype(np.float32, copy=False)
    dtype = str(reader_dtype(path, array))
    return array, affine, spacing, dtype


def reader_dtype(path: Path, array: np.ndarray):
    """The stored data type of a volume file (NIfTI's header type; else the type read)."""
    if str(path).lower().endswith(NIFTI_ENDINGS):
        import nibabel as nib

        return nib.load(str(path)).get_data_dtype()
    return array.dtype


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """`items`, with a rich progress bar on stderr while they are worked through (on a terminal only:
    logs and pipes stay clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    items = list(items)
    console = Console(stderr=True)
    if not console.is_terminal or not items:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield from progress.track(items, total=total or len(items), description=description)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def inspect_cases(cases: list[dict], num_classes: int) -> list[CaseReport]:
    """Check the NIfTI files of any dataset's case dicts (`medexp data check` on e.g. the demo data)."""
    reports = []
    for case in cases:
        files = CaseFiles(case["id"], [Path(case["image"])], Path(case["label"]))
        report = read_case(files, Path(case["image"]).parent.parent, 1).report
        report.problems += outside_labels(
            report.files[-1], report.values, dict.fromkeys(range(num_classes), 0), "the classes"
        )
        reports.append(report)
    return reports
