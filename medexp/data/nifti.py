"""`dataset=nifti` / `dataset=msd`: a folder of NIfTI (or 2D image) files and label maps, preprocessed once.

`prepare()` finds the cases (medexp.data.layout), reads every file once, checks it (medexp.data.reading), maps
label values to classes, preprocesses as in Wong & Moradi 3.1 (medexp.data.transforms.preprocess_case) and
writes the result as .npy arrays under `<cache_dir>/<name>-<key>/`, where the key hashes the preprocessing
settings, the folder and its file names. Each case also gets a JSON with the fingerprint (size, mtime) of its
files, the verdict of the checks, the stored header (shape, affine, spacing) and the preprocessing record
(output affine and shapes), so a later run reuses what did not change and `medexp predict` can map outputs
back to the original grid. The splits file lives in the same folder (`info.root`): the data folder itself is
only read. Any problem stops `prepare()` with a DataError before a training run starts.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

from medexp.data import cache_io
from medexp.data.base import DatasetInfo
from medexp.data.folder_options import check_options, save_arrays, slice_items
from medexp.data.images2d import is_2d_file
from medexp.data.labels import class_values, ignore_value
from medexp.data.layout import Layout, class_table, discover, parse_labels
from medexp.data.reading import outside_labels, read_case, track
from medexp.data.records import CaseFiles, CaseReport
from medexp.data.sizes import (
    DEFAULT_MAX_VOXELS,
    Header,
    preprocessed_shape,
    read_header,
    too_large,
)
from medexp.data.transforms import preprocess_case
from medexp.errors import ConfigError, DataError

VERSION = 2  # bump when the cached arrays change meaning (2: case files keyed by a hash of their sources)
MAX_NAME = 100  # characters of a dataset name: it names the cache folder, MLflow inputs and tags


class NiftiDataset:
    """Cases of a data folder, preprocessed and cached on disk.

    Args:
        root: the data folder (see medexp.data.layout for the layouts it understands).
        name: short name for tags and the cache folder; default dataset.json "name" or the folder name.
        labels: {label value: class name} (several values may share a name), or a list of names for the values
            0, 1, ...; None = dataset.json "labels", else every value found (names "label<value>").
        unlisted_labels: "error" (default) or "background": what label values missing from `labels` become.
        modalities: channel suffixes in input order (e.g. ["t1", "flair"] for `<case>_t1.nii.gz`).
        layout: "auto", "msd" (a dataset.json is required) or "folders".
        spatial_dims: 3, or 2 to train on slices of the volumes (or on 2D image files).
        slice_axis: axis (after reorientation; 2 = axial for RAS) that 2D slices are cut across.
        shape: spatial size after preprocessing (paper: 128^3); 2 sizes when spatial_dims=2.
        spacing: isotropic voxel size in mm to resample to (a number, or one per axis); None keeps the grid.
        orientation: axis codes to reorient to (default RAS), None keeps the stored axis order.
        normalize: "zscore" (not stated by Wong & Moradi), "zscore_nonzero", "minmax" (NeRD) or "none".
        fit: how the resampled image reaches `shape`: "pad_resize" (zero-pad to its aspect ratio, then
            resize; Wong & Moradi 3.1), "crop" (centre crop, padding where smaller; NeRD 3.2) or "resize"
            (straight resize; Nair et al.); see medexp.data.transforms.fit_to_target.
        cache_dir: where preprocessed cases and splits go; default outputs/cache (under the working dir).
        max_voxels: most voxels one file may hold as stored, and one case after resampling and padding
            (both known from the header before anything is read; medexp.data.sizes).
    """

    def __init__(
        self,
        root: str | None = None,
        name: str | None = None,
        labels: dict | list | None = None,
        unlisted_labels: str = "error",
        modalities: list[str] | None = None,
        layout: str = "auto",
        spatial_dims: int = 3,
        slice_axis: int = 2,
        shape: list[int] = (128, 128, 128),
        spacing: float | list[float] | None = 1.0,
        orientation: str | None = "RAS",
        normalize: str = "zscore",
        cache_dir: str | None = None,
        fit: str = "pad_resize",
        max_voxels: int = DEFAULT_MAX_VOXELS,
    ) -> None:
        self.root = root
        self.name = name
        self.labels = labels
        self.unlisted_labels = unlisted_labels
        self.modalities = [str(m) for m in modalities] if modalities else None
        self.layout = layout
        self.spatial_dims = int(spatial_dims)
        self.slice_axis = int(slice_axis)
        self.shape = [int(s) for s in shape]
        self.spacing = spacing
        self.orientation = orientation
        self.normalize = normalize
        self.fit = fit
        self.cache_dir = cache_dir or "outputs/cache"
        self.max_voxels = max_voxels
        self.stats = {"preprocessed": 0, "reused": 0, "read": 0}
        self._info: DatasetInfo | None = None

    # --- public API -------------------------------------------------------------------------------------
    @property
    def info(self) -> DatasetInfo:
        """The DatasetInfo (prepares the data on first use)."""
        if self._info is None:
            self.prepare()
        return self._info

    def inspect(self) -> tuple[list[CaseReport], str]:
        """Check every case (verdicts of unchanged files come from the cache); nothing is preprocessed.

        Returns:
            (one report per case or stray file, with all problems; the data folder).
        """
        found, cache = self._start()
        reports = [self._verdict(case, found, cache)[0] for case in found.cases]
        lut = self._lut(found, reports)
        return self._finish(found, reports, lut), str(found.root)

    def prepare(self) -> list[dict]:
        """Check, preprocess (or reuse) every case.

        Returns:
            [{"id", "image", "label"}] of cached .npy arrays (C, *shape) and (1, *shape); with spatial_dims=2
            on volumes, each case also has "slices": [{"id", "image", "label"}] of its 2D slices.

        Raises:
            DataError: the first problem (file and what is wrong) and how many more there are.
        """
        found, cache = self._start()
        lut = self._lut(found, None)  # None: labels come from the values found, known after reading all
        reports, done, failed = [], set(), bool(found.problems)
        for case in track(found.cases, "preprocess" if lut else "check"):
            report, data = self._verdict(case, found, cache)
            failed = failed or bool(report.problems or (lut and self._outside(report, found, lut[0])))
            if not failed and lut is not None and data is not None:  # just read: preprocess while in memory
                self._preprocess(case, cache, lut, data)
                done.add(case.id)
            reports.append(report)
        lut = lut or self._lut(found, reports)
        problems = [p for r in self._finish(found, reports, lut) for p in r.problems]
        if problems:
            where = problems[0] if problems[0].startswith("dataset") else found.root / problems[0]
            more = f" (+{len(problems) - 1} more; `medexp data check` with the same overrides lists all)"
            raise DataError(f"{where}{more if len(problems) > 1 else ''}")
        for case in track([c for c in found.cases if c.id not in done], "preprocess"):
            self._ensure_preprocessed(case, found, cache, lut)
        return self._cases(found, cache, lut, reports)

    def preprocess_image(self, image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image (C, *spatial) with its (4, 4) affine, preprocessed as the training cases were (for
        `medexp predict`): (image (C, *shape), the affine of that grid)."""
        dims = image.ndim - 1
        header = Header(tuple(image.shape[1:]), np.linalg.norm(affine[:dims, :dims], axis=0).tolist())
        if dims == 3:
            header.world_axes = [int(a) for a in nib.orientations.io_orientation(affine)[:, 0]]
        self._check_prepared_size("the image", header, dims, int(image.shape[0]))
        label = np.zeros((1, *image.shape[1:]), dtype=np.uint8)
        out, _, record = preprocess_case(
            image, label, affine, target=self._target(dims), spacing=self._pixdim(dims),
            orientation=self.orientation, normalize=self.normalize, fit=self.fit,
        )  # fmt: skip
        return out, np.asarray(record["affine"])

    # --- steps ------------------------------------------------------------------------------------------
    def _start(self) -> tuple[Layout, Path]:
        """Check options, find the cases, pick the cache folder."""
        check_options(self)
        found = discover(self.root, self.layout, self.modalities)
        if self.spatial_dims == 3 and any(is_2d_file(c.images[0]) for c in found.cases):
            raise ConfigError(
                "dataset.spatial_dims=3: 2D image files need dataset.spatial_dims=2 and a 2D dataset.shape"
            )
        files = sorted(str(p.relative_to(found.root)) for c in found.cases for p in [*c.images, c.label])
        key = cache_io.hash(
            {"settings": self._settings(), "root": str(found.root.resolve()), "files": files}
        )[:12]
        self._root = found.root
        cache = Path(self.cache_dir).resolve() / f"{cache_io.safe(self._name(found))}-{key}"
        (cache / "cases").mkdir(parents=True, exist_ok=True)
        cache_io.remove_stale_temp(cache)  # writes a killed run left half done
        cache_io.write_json(cache / "settings.json", {"root": str(found.root.resolve()), **self._settings()})
        return found, cache

    def _name(self, found: Layout) -> str:
        """dataset.name, else dataset.json "name" or the folder name; at most MAX_NAME characters."""
        name = self.name or found.name
        if len(str(name)) > MAX_NAME:
            where = "dataset.name" if self.name else f"{found.root / 'dataset.json'} name (or folder name)"
            raise DataError(
                f"{where}: {len(str(name))} characters, at most {MAX_NAME}; set a shorter dataset.name"
            )
        return str(name)

    def _case_file(self, case: CaseFiles) -> str:
        """The cache files' stem of a case, `cases/<id>-<hash>`: the hash of its source files (relative to
        the data folder) keeps two cases apart even if their ids look alike after `safe` (the folder key
        holds the preprocessing settings)."""
        sources = [str(Path(p).relative_to(self._root)) for p in [*case.images, case.label]]
        return f"cases/{cache_io.safe(case.id)[-80:]}-{cache_io.hash(sources)[:12]}"

    def _size_report(self, case: CaseFiles, found: Layout) -> CaseReport | None:
        """The report of a case with a file over dataset.max_voxels, from the headers alone (stored size,
        and for volumes the size after resampling and padding), or None when every file fits."""
        problems, shown = [], None
        for path in [*case.images, case.label]:
            name = str(Path(path).relative_to(found.root))
            header = read_header(path)
            if header is None:
                continue
            shown = shown or header
            problem = too_large(name, header.shape, header.voxels, self.max_voxels, "header size")
            if not problem and path != case.label and not is_2d_file(path):
                dims = min(3, len(header.shape))
                try:
                    self._check_prepared_size(name, header, dims, math.prod(header.shape[dims:]))
                except DataError as err:
                    problem = str(err)
            problems += [problem] if problem else []
        if not problems:
            return None
        files = [str(Path(p).relative_to(found.root)) for p in [*case.images, case.label]]
        return CaseReport(case.id, files, list(shown.shape[:3]), spacing=shown.spacing, problems=problems)

    def _check_prepared_size(self, name: str, header: Header, dims: int, channels: int) -> None:
        """DataError if preprocessing would make more than dataset.max_voxels voxels of this image."""
        shape = preprocessed_shape(header, self._pixdim(dims), self.orientation, self._target(dims), self.fit)
        what = "resampled" + (f" to {self.spacing} mm" if self.spacing is not None else "") + " and padded"
        hint = ", or choose a coarser dataset.spacing"
        problem = too_large(name, shape, math.prod(shape) * channels, self.max_voxels, what, hint)
        if problem:
            raise DataError(problem)

    def _settings(self) -> dict:
        """Everything the cached arrays depend on (besides the files)."""
        keys = ("labels", "unlisted_labels", "modalities", "layout", "spatial_dims", "slice_axis", "shape")
        keys += ("spacing", "orientation", "normalize") + (("fit",) if self.fit != "pad_resize" else ())
        return {"version": VERSION, **{k: cache_io.plain(getattr(self, k)) for k in keys}}

    def _lut(self, found: Layout, reports: list[CaseReport] | None):
        """({value: class}, names) from dataset.labels, else dataset.json, else the values in `reports`."""
        if self.labels is not None:
            return class_table(parse_labels(cache_io.plain(self.labels), "dataset.labels"))
        if found.labels is not None:
            return class_table(found.labels)
        if reports is None:
            return None
        values = sorted({int(v) for r in reports for v in r.values if np.isfinite(v) and v == int(v)})
        return class_table({v: "background" if v == 0 else f"label{v}" for v in values})

    def _outside(self, report: CaseReport, found: Layout, lut: dict[int, int]) -> list[str]:
        if self.unlisted_labels == "background":
            return []
        where = "dataset.labels" if self.labels is not None else "dataset.json labels"
        if self.labels is None and found.labels is None:
            return []
        return outside_labels(report.files[-1], report.values, lut, where)

    def _verdict(self, case: CaseFiles, found: Layout, cache: Path):
        """(report, data or None): the cached verdict if the files are unchanged, else read and check them.
        A file over dataset.max_voxels is refused from its header first, every time (the limit may change)."""
        too_large = self._size_report(case, found)
        if too_large:
            return too_large, None
        path = cache / f"{self._case_file(case)}.json"
        record = cache_io.read_json(path)
        fingerprint = cache_io.fingerprint(case, found.root)
        if record and record.get("fingerprint") == fingerprint:
            return CaseReport.from_dict(record["report"]), None
        data = read_case(case, found.root, found.channels_4d, self.max_voxels)
        self.stats["read"] += 1
        cache_io.write_json(
            path, {"fingerprint": fingerprint, "report": data.report.to_dict(), "original": data.original}
        )
        return data.report, (data if not data.report.problems else None)

    def _finish(self, found: Layout, reports: list[CaseReport], lut) -> list[CaseReport]:
        """Stray files first, then the cases with dataset-level problems added (labels, channels, count)."""
        out = [CaseReport.from_dict(r.to_dict()) for r in found.problems + reports]
        counts = [r.channels for r in reports if r.channels]
        usual = max(set(counts), key=counts.count) if counts else 0
        for r in out[len(found.problems) :]:
            r.problems += self._outside(r, found, lut[0]) if lut else []
            if r.channels and r.channels != usual and not r.problems:  # not when a file is unreadable
                r.problems.append(
                    f"{r.files[0]}: {r.channels} image channel(s) where most cases have {usual}"
                )
        usable = sum(1 for r in out if not r.problems)
        if usable and usable < 3:
            out.append(
                CaseReport(
                    "(dataset)", problems=[f"dataset: {usable} usable case(s), need >= 3 (train/val/test)"]
                )
            )
        if lut and len(lut[1]) < 2:
            out.append(
                CaseReport("(dataset)", problems=["dataset: the label maps hold only background (value 0)"])
            )
        return out

    def _prep_key(self, lut) -> str:
        return cache_io.hash({"settings": self._settings(), "lut": sorted(lut[0].items()), "names": lut[1]})[
            :16
        ]

    def _ensure_preprocessed(self, case: CaseFiles, found: Layout, cache: Path, lut) -> None:
        """Reuse the cached arrays of a case if they are current, else read and preprocess it again."""
        prep = cache_io.read_json(cache / f"{self._case_file(case)}.json").get("prep") or {}
        # the record is written after the arrays, with their sizes: a half-written case is redone, not read
        current = prep.get("key") == self._prep_key(lut)
        if current and cache_io.complete(cache, prep["files"], prep.get("sizes")):
            self.stats["reused"] += 1
            return
        self.stats["read"] += 1
        self._preprocess(case, cache, lut, read_case(case, found.root, found.channels_4d, self.max_voxels))

    def _preprocess(self, case: CaseFiles, cache: Path, lut, data) -> None:
        """Map label values to classes, preprocess, write the arrays and the record into the case's JSON."""
        classes = np.array([lut[0].get(int(v), 0) for v in data.values], dtype=np.uint8)
        dims = data.image.ndim - 1
        image, label, steps = preprocess_case(
            data.image,  # (C, *spatial)
            classes[data.inverse][None],  # (1, *spatial) class indices
            data.affine,
            target=self._target(dims),
            spacing=None if data.is_2d else self._pixdim(dims),
            orientation=self.orientation,
            normalize=self.normalize,
            fit=self.fit,
        )
        path = cache / f"{self._case_file(case)}.json"
        record = cache_io.read_json(path)
        files = save_arrays(
            cache, self._case_file(case), image, label, self.slice_axis if self.spatial_dims == 2 else None
        )
        record["prep"] = {"key": self._prep_key(lut), "files": files, "record": steps}
        record["prep"]["sizes"] = cache_io.sizes(cache, files)
        cache_io.write_json(path, record)
        self.stats["preprocessed"] += 1

    def _target(self, data_dims: int) -> list[int]:
        """Output size per axis of the stored data: `shape`, with -1 on the slice axis for 2D slicing."""
        if self.spatial_dims == 3 or data_dims == 2:
            return list(self.shape)
        target = list(self.shape)
        target.insert(self.slice_axis, -1)
        return target

    def _pixdim(self, data_dims: int) -> list[float] | None:
        if self.spacing is None:
            return None
        spacing = (
            cache_io.plain(self.spacing)
            if cache_io.is_seq(self.spacing)
            else [float(self.spacing)] * data_dims
        )
        if self.spatial_dims == 2 and data_dims == 3 and len(spacing) == 3:
            spacing[self.slice_axis] = -1  # keep the slices as acquired: no interpolated slices
        return spacing

    def _cases(self, found: Layout, cache: Path, lut, reports: list[CaseReport]) -> list[dict]:
        """Case dicts of the cached arrays, and the DatasetInfo.

        Each case carries "spacing", its own voxel size after preprocessing (surface distances use it); its
        slices carry "volume", "slice", "slice_axis" and "volume_spacing", so evaluation can stack their
        predictions back into the volume (medexp.evaluation.inference).
        """
        cases, spacings = [], []
        for case in found.cases:
            prep = cache_io.read_json(cache / f"{self._case_file(case)}.json")["prep"]
            files = [str(cache / f) for f in prep["files"]]
            own = [float(s) for s in prep["record"]["spacing"]]
            item = {"id": case.id, "image": files[0], "label": files[1], "spacing": own}
            if len(files) > 2:
                item["slices"] = slice_items(case.id, files[2:], self.slice_axis, own)
            spacing = prep["record"]["spacing"]
            if len(spacing) == 3 and self.spatial_dims == 2:
                spacing = [s for i, s in enumerate(spacing) if i != self.slice_axis]
            spacings.append(spacing)
            cases.append(item)
        channels = [r.channels for r in reports if r.channels]
        self._info = DatasetInfo(
            name=self._name(found),
            num_classes=len(lut[1]),
            label_names=list(lut[1]),
            in_channels=max(set(channels), key=channels.count),
            spatial_dims=self.spatial_dims,
            shape=list(self.shape),
            root=str(cache),
            spacing=np.median(np.asarray(spacings), axis=0).round(6).tolist(),
            channel_names=list(found.channel_names),
            label_values=class_values(lut[0], len(lut[1])),
            ignore_label=ignore_value(lut[0]),
            channel_files=list(found.channel_files),
            source=str(found.root.resolve()),
        )
        return cases
