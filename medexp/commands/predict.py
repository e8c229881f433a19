"""`medexp predict MODEL -i FILE_OR_DIR -o DIR`: images in, label maps on the input's grid out.

MODEL is an MLflow model (`runs:/<run id>/model`, `models:/<name>/<version>`, `models:/<name>@<alias>`),
which needs nothing but the tracking store; a run's output folder or checkpoint file; or a run id (its
checkpoint when its output folder is here, else its MLflow model). Inputs are what training accepted:
single files (3D, or 4D with all channels), or one file per channel grouped by case as in training
(`<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... for nnU-Net, `<case>_t1.nii.gz`, ... with
dataset.modalities), in any ending training reads (NIfTI, NRRD, MetaImage). Each case is segmented by
medexp.tracking.models.Segmenter (the run's preprocessing, sliding windows, inverse resampling) and written
as `<case><ending>` (a single file keeps its name) in the dataset's label values, with the input's shape,
affine and header.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from rich.progress import track

from medexp.data.base import DatasetInfo
from medexp.data.layout import CHANNEL, SUFFIXES_3D, strip_suffix
from medexp.data.reading import NIFTI_ENDINGS, NRRD_ENDINGS, read_images
from medexp.data.sizes import DEFAULT_MAX_VOXELS
from medexp.errors import DataError
from medexp.run.restore import restore
from medexp.tracking.models import MODEL_NAME, Segmenter, load_segmenter
from medexp.tracking.queries import get_run
from medexp.tracking.store import resolve_uri

MODEL_URIS = ("runs:/", "models:/")
PROBABILITIES = "_probabilities.nii.gz"


def input_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus the image files (any ending training reads) of every folder given."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and strip_suffix(p.name, SUFFIXES_3D))
            if not found:
                raise DataError(f"{item}: no image files ({', '.join(SUFFIXES_3D)}) in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return files


def group_cases(files: list[Path], info: DatasetInfo) -> list[tuple[str, list[Path]]]:
    """(output file name, channel files in input order) of every case among `files`.

    A file `<case>_<suffix><ending>` whose suffix is one of the run's channel files belongs to case
    `<case>`; any other file is a case of its own (a 3D file, or a 4D file holding every channel).

    Raises:
        DataError: a case without one of its channel files (naming the file expected).
    """
    grouped: dict[tuple[Path, str, str], dict[str, Path]] = {}
    cases: list[tuple[str, list[Path]]] = []
    for f in files:
        stem = strip_suffix(f.name, SUFFIXES_3D) or f.stem
        ending = f.name[len(stem) :]
        match = CHANNEL.match(stem)
        if info.channel_files and match and match["channel"] in info.channel_files:
            grouped.setdefault((f.parent, match["case"], ending), {})[match["channel"]] = f
        else:
            cases.append((f.name, [f]))
    for (folder, case, ending), channels in grouped.items():
        missing = [c for c in info.channel_files if c not in channels]
        if missing:
            raise DataError(
                f"{folder / f'{case}_{missing[0]}{ending}'}: channel file of case {case} not found"
            )
        cases.append((f"{case}{ending}", [channels[c] for c in info.channel_files]))
    return sorted(cases)


def output_path(out_dir: Path, name: str) -> Path:
    """`out_dir / name`, refused unless `name` is a plain file name (no folder part, no '..', not absolute)
    and nothing at that path is a symbolic link (outputs are never written through one).

    Raises:
        DataError: one line naming the file name or path.
    """
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise DataError(f"{name!r}: not a plain file name; medexp predict writes only inside -o {out_dir}")
    path = out_dir / name
    if path.is_symlink():
        where = "leads outside -o" if not path.resolve().is_relative_to(out_dir.resolve()) else "is a link"
        raise DataError(f"{path}: {where} {out_dir} (a symbolic link); refused, nothing written")
    return path


def output_names(name: str, probabilities: bool) -> list[str]:
    """The files one case `name` (see `group_cases`) writes: its label map (an .nhdr input gives an .nrrd),
    and with `probabilities` `<case>_probabilities.nii.gz`."""
    labels = f"{name[:-5]}.nrrd" if name.lower().endswith(".nhdr") else name
    stem = strip_suffix(name, SUFFIXES_3D) or Path(name).stem
    return [labels, f"{stem}{PROBABILITIES}"] if probabilities else [labels]


def check_outputs(cases: list[tuple[str, list[Path]]], out_dir: Path, probabilities: bool = False) -> None:
    """Refuse outputs (see `output_names`) that escape `out_dir` or sit on a symbolic link, that two cases
    or files share (one would replace the other: `x` and `x_probabilities` with --probabilities, or names
    that differ only in case), or that would overwrite an input (e.g. -o the input folder); one line, before
    anything is written."""
    inputs = {p.resolve() for _, paths in cases for p in paths}
    seen: dict[str, Path] = {}
    for name, paths in cases:
        for out_name in output_names(name, probabilities):
            target = output_path(out_dir, out_name).resolve()
            if target in inputs:
                raise DataError(
                    f"{out_dir / out_name}: would overwrite the input {target}; choose another -o folder"
                )
            key = out_name.casefold()
            if key in seen:
                raise DataError(
                    f"{out_dir / out_name}: both {seen[key]} and {paths[0]} would be written there "
                    "(one output would replace the other); rename one input"
                )
            seen[key] = paths[0]


@contextlib.contextmanager
def placing(out_dir: Path) -> Iterator[Path]:
    """A private folder (mode 0700) inside `out_dir`: files written there are moved into `out_dir` with
    os.replace by `place`, which replaces a symbolic link at the target instead of following it, and no
    one else can swap a file in the private folder for a link while a writer opens it by name."""
    tmp = Path(tempfile.mkdtemp(prefix=".medexp-predict-", dir=out_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place(tmp: Path, out_dir: Path) -> None:
    """Move every file written in `tmp` (a label map and, for MetaImage, its data file) into `out_dir`."""
    for file in sorted(tmp.iterdir()):
        os.replace(file, out_dir / file.name)


def load_model(source: str, tracking_uri: str | None = None) -> Segmenter:
    """The Segmenter of an MLflow model URI, a run folder or checkpoint, or a run id (see the module doc)."""
    uri = resolve_uri(tracking_uri)
    if source.startswith(MODEL_URIS):
        return load_segmenter(source, uri)
    if Path(source).exists():
        return _from_checkpoint(source, uri)
    run = get_run(uri, source)
    if run is None:
        raise DataError(f"{source}: no such file, folder or MLflow run (store {uri})")
    folder = Path(run["tags"].get("medexp.output_dir", ""))
    if run["tags"].get("medexp.output_dir") and (folder / "checkpoints" / "best.pt").exists():
        return _from_checkpoint(source, uri)
    return load_segmenter(f"runs:/{source}/{MODEL_NAME}", uri)


def _from_checkpoint(source: str, uri: str) -> Segmenter:
    run = restore(source, "best", uri)
    return Segmenter(run.cfg, run.dataset_info(), run.state["model"])


def write_labels(path: Path, labels: np.ndarray, like: Path, affine: np.ndarray) -> None:
    """Write a label map (X, Y, Z) as `path`, in the format and with the header of the input `like`."""
    low = path.name.lower()
    if low.endswith(NIFTI_ENDINGS):
        import nibabel as nib

        img = nib.load(str(like))
        header = img.header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_data_shape(labels.shape)
        nib.save(nib.Nifti1Image(labels, img.affine, header), str(path))
    elif low.endswith(NRRD_ENDINGS):
        import nrrd

        header = dict(nrrd.read_header(str(like)))
        for key in ("type", "dimension", "sizes", "kinds", "data file", "datafile", "encoding"):
            header.pop(key, None)
        header["encoding"] = "gzip"
        header["kinds"] = ["domain"] * labels.ndim
        nrrd.write(str(path.with_suffix(".nrrd")) if low.endswith(".nhdr") else str(path), labels, header)
    else:
        from monai.data import ITKWriter

        writer = ITKWriter(output_dtype=labels.dtype)
        writer.set_data_array(labels, channel_dim=None)
        writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
        writer.write(str(path))


def predict(source: str, inputs: list[str], out_dir: str, probabilities: bool = False, tracking_uri=None):
    """Segment every input case with the model `source`; returns the written paths."""
    files = input_files(inputs)
    segmenter = load_model(source, tracking_uri)
    cases = group_cases(files, segmenter.info)
    out = Path(out_dir)
    check_outputs(cases, out, probabilities)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()  # one folder, checked, for every write below
    written = []
    for name, paths in track(cases, description="predict"):
        limit = getattr(segmenter.dataset, "max_voxels", DEFAULT_MAX_VOXELS)  # the run's dataset.max_voxels
        image, affine = read_images(paths, segmenter.info.in_channels, limit)  # (C, X, Y, Z)
        probs = segmenter.probabilities(image, affine)  # (K, X, Y, Z)
        names = output_names(name, probabilities)
        with placing(out) as tmp:
            write_labels(tmp / name, segmenter.labels(probs), paths[0], affine)
            if probabilities:
                import nibabel as nib

                per_class = np.moveaxis(probs, 0, -1).astype(np.float32)  # (X, Y, Z, K)
                nib.save(nib.Nifti1Image(per_class, affine), str(tmp / names[1]))
            place(tmp, out)
        written.append(out / names[0])
    return written
