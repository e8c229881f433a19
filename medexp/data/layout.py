"""Find the cases of a data folder: which image file(s) and which label map make up each case.

Layouts, tried in this order:
- a `dataset.json` with a "training" list of {"image", "label"} (Medical Segmentation Decathlon, nnU-Net v1);
  an image may be one 4D file of all modalities (MSD) or per-modality files `<case>_0000.nii.gz`, ...;
- `imagesTr/` + `labelsTr/` (nnU-Net v2, whose dataset.json has no training list) or `images/` +
  `labels/`: a label `<case><ending>` goes with the image `<case><ending>`, or with several images
  `<case>_<channel><ending>` (nnU-Net `_0000`, `_0001`, ..., or names such as `_t1`, `_flair` listed in
  `dataset.modalities`), one input channel each.

nnU-Net v2's dataset.json keys are read as nnU-Net reads them: `channel_names` ({"0": "T1", ...}), `labels`
({"background": 0, "tumour": 1, "ignore": 2}; see medexp.data.labels for `ignore` and region labels) and
`file_ending` (".nii.gz", ".nrrd", ".mha", ...: only files with that ending are cases). `dataset.root` may
also be an nnU-Net dataset id ("4", "004" or "Dataset004_Hippocampus") looked up in `$nnUNet_raw`, as
nnU-Net's own commands take it.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medexp.data.images2d import SUFFIXES_2D
from medexp.data.labels import class_table, parse_labels  # noqa: F401 - re-exported for the datasets
from medexp.data.reading import ITK_ENDINGS, NIFTI_ENDINGS, NRRD_ENDINGS
from medexp.data.records import CaseFiles, CaseReport
from medexp.errors import DataError

SUFFIXES_3D = NIFTI_ENDINGS + NRRD_ENDINGS + ITK_ENDINGS
IMAGE_DIRS = ("imagesTr", "images")
LABEL_DIRS = ("labelsTr", "labels")
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>[^_]+)$")
NNUNET_RAW = "nnUNet_raw"
NNUNET_ID = re.compile(r"^(?:Dataset)?(?P<id>\d{1,3})(?:_[\w.-]+)?$")


@dataclass
class Layout:
    """What `discover` found in a data folder.

    Attributes:
        root: the data folder.
        name: dataset.json "name" or the folder name.
        cases: complete cases.
        problems: files that do not make a case (an image without a label, ...), one report each.
        channel_names: modality names (dataset.json "modality"/"channel_names", or the channel suffixes).
        channels_4d: channels one 4D image may hold (the number of MSD modalities), 1 if 4D is not expected.
        channel_files: the channel suffixes of per-channel cases ("0000", "0001" or "t1", "flair"), in
            input order; empty when every case is one file.
        endings: the file endings that count as images and label maps.
        manifest_labels: dataset.json "labels" as written (parsed by `labels`).
    """

    root: Path
    name: str
    cases: list[CaseFiles] = field(default_factory=list)
    problems: list[CaseReport] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)
    channels_4d: int = 1
    channel_files: list[str] = field(default_factory=list)
    endings: tuple[str, ...] = SUFFIXES_3D + SUFFIXES_2D
    manifest_labels: dict | list | None = None

    @property
    def labels(self) -> dict[int, str] | None:
        """{value: name} from dataset.json, or None without labels there.

        Parsed when first needed, i.e. only when `dataset.labels` is not given: a dataset.json with region
        labels then stops with one line saying which dataset.labels to give (medexp.data.labels).
        """
        if not self.manifest_labels:
            return None
        return parse_labels(self.manifest_labels, f"{self.root / 'dataset.json'} labels")


def strip_suffix(name: str, endings: tuple[str, ...] = SUFFIXES_3D + SUFFIXES_2D) -> str | None:
    """File name without its image ending (".nii.gz", ".png", ...), or None for other files."""
    low = name.lower()
    for suffix in endings:
        if low.endswith(suffix) and not name.startswith("."):
            return name[: -len(suffix)]
    return None


def _suffix(name: str, endings: tuple[str, ...] = SUFFIXES_3D + SUFFIXES_2D) -> str:
    stem = strip_suffix(name, endings)
    return name[len(stem) :] if stem is not None else ""


def resolve_root(root: str | None) -> Path:
    """The data folder named by `dataset.root`: a folder, or an nnU-Net dataset id under $nnUNet_raw.

    Raises:
        DataError: unset, not found, or an id without (or not found under) nnUNet_raw.
    """
    if root is None or str(root).strip() in ("", "???"):
        raise DataError(
            "dataset.root is not set: give the folder of your data, e.g. dataset.root=/data/brains"
        )
    path = Path(str(root)).expanduser()
    if path.is_dir():
        return path
    match = NNUNET_ID.match(str(root).strip())
    if not match:
        raise DataError(f"dataset.root={root}: folder not found")
    raw = os.environ.get(NNUNET_RAW)
    if not raw:
        raise DataError(
            f"dataset.root={root}: not a folder; as an nnU-Net dataset id it needs {NNUNET_RAW} set to the "
            "folder that holds the Dataset<ID>_<name> folders"
        )
    named = Path(raw).expanduser() / str(root).strip()
    found = (
        [named] if named.is_dir() else sorted(Path(raw).expanduser().glob(f"Dataset{int(match['id']):03d}_*"))
    )
    found = [p for p in found if p.is_dir()]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise DataError(
            f"dataset.root={root}: {what} Dataset{int(match['id']):03d}_* folder(s) in {NNUNET_RAW}={raw}"
        )
    return found[0]


def nnunet_id(folder: str | Path) -> str | None:
    """The nnU-Net dataset id of a `Dataset<ID>_<name>` folder ("42" for Dataset042_Phantom), else None."""
    match = re.match(r"^Dataset(?P<id>\d{3})_", Path(folder).name)
    return str(int(match["id"])) if match else None


def discover(root: str | None, layout: str = "auto", modalities: list[str] | None = None) -> Layout:
    """The cases of the folder `root`.

    Args:
        root: data folder (read only), or an nnU-Net dataset id (see `resolve_root`).
        layout: "auto" (dataset.json training list if there is one, else folders), "msd" (needs dataset.json)
            or "folders" (ignore a dataset.json training list).
        modalities: channel suffixes in input-channel order, e.g. ["t1", "flair"]; None = all found, sorted.

    Returns:
        the Layout; files that do not make a case are in `.problems` (all of them, not just the first).

    Raises:
        DataError: root unset or missing, no cases at all, an unsupported file_ending.
    """
    path = resolve_root(root)
    manifest_path = path / "dataset.json"
    manifest = _read_manifest(manifest_path)
    training = manifest.get("training")
    if layout == "msd" and not training:
        raise DataError(f"{manifest_path}: missing or without a 'training' list (needed by dataset=msd)")
    found = Layout(root=path, name=str(manifest.get("name") or path.name))
    found.manifest_labels = manifest.get("labels") or None
    ending = manifest.get("file_ending")
    if ending is not None:
        if str(ending).lower() not in SUFFIXES_3D + SUFFIXES_2D:
            allowed = ", ".join(SUFFIXES_3D + SUFFIXES_2D)
            raise DataError(
                f"{manifest_path}: file_ending {ending!r} is not supported; expected one of {allowed}"
            )
        found.endings = (str(ending).lower(),)
    names = manifest.get("modality") or manifest.get("channel_names") or {}
    found.channel_names = [str(names[k]) for k in sorted(names, key=lambda k: int(k))] if names else []
    if training and layout != "folders":
        found.channels_4d = max(1, len(found.channel_names))
        _from_manifest(found, training)
    else:
        _scan(found, modalities)
    unique_ids(found)
    if not found.cases and not found.problems:
        raise DataError(f"{path}: no image/label pairs found: {_EXPECTED}")
    return found


_EXPECTED = (
    "expected imagesTr/ + labelsTr/ (Medical Segmentation Decathlon, nnU-Net), images/ + labels/ "
    "with matching file names, or a dataset.json with a 'training' list"
)


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable as JSON ({' '.join(str(err).split())})") from err
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object")
    return manifest


def _from_manifest(found: Layout, training: list) -> None:
    """Cases from a dataset.json "training" list; paths are relative to the folder."""
    for k, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            found.problems.append(
                CaseReport(f"training[{k}]", problems=[f"dataset.json: training[{k}] needs image and label"])
            )
            continue
        label = found.root / entry["label"]
        case_id = strip_suffix(label.name) or label.name
        problems, images = [], []
        for image in entry["image"] if isinstance(entry["image"], list) else [entry["image"]]:
            image = found.root / image
            stem = strip_suffix(image.name) or image.stem
            channels = sorted(image.parent.glob(f"{stem}_[0-9][0-9][0-9][0-9]{_suffix(image.name)}"))
            images += [image] if image.exists() else channels
            if not image.exists() and channels and not found.channel_files:
                found.channel_files = [c.name[len(stem) + 1 : len(stem) + 5] for c in channels]
            if not image.exists() and not channels:
                why = link_problem(image) or "listed in dataset.json but not found"
                problems.append(f"{_rel(image, found.root)}: {why}")
        problems += [f"{_rel(p, found.root)}: {link_problem(p)}" for p in images if link_problem(p)]
        if not label.exists():
            why = link_problem(label) or "listed in dataset.json but not found"
            problems.append(f"{_rel(label, found.root)}: {why}")
        if problems:
            found.problems.append(
                CaseReport(case_id, [_rel(p, found.root) for p in [*images, label]], problems=problems)
            )
        else:
            found.cases.append(CaseFiles(case_id, images, label))


def _scan(found: Layout, modalities: list[str] | None) -> None:
    """Cases from images/ + labels/ (or imagesTr/ + labelsTr/) with matching names."""
    root, endings = found.root, found.endings
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    label_dir = next((root / d for d in LABEL_DIRS if (root / d).is_dir()), None)
    if image_dir is None or label_dir is None:
        raise DataError(f"{root}: no image/label pairs found: {_EXPECTED}")
    labels: dict[str, Path] = {}
    for f in _files(found, label_dir):
        stem = strip_suffix(f.name, endings)
        if stem in labels:
            _two_files(found, stem, labels[stem], f)
        else:
            labels[stem] = f
    channels: dict[str, dict[str | None, Path]] = {}
    orphans: list[Path] = []
    for f in _files(found, image_dir):
        stem = strip_suffix(f.name, endings)
        match = CHANNEL.match(stem)
        if stem in labels:
            case, channel = stem, None
        elif match and match["case"] in labels:
            case, channel = match["case"], match["channel"]
        else:
            orphans.append(f)
            continue
        if channel in channels.get(case, {}):  # c0.nii and c0.nii.gz: one would silently replace the other
            _two_files(found, case, channels[case][channel], f)
        else:
            channels.setdefault(case, {})[channel] = f
    names = list(modalities) if modalities else sorted({c for chans in channels.values() for c in chans if c})
    found.channel_names = found.channel_names or names
    found.channel_files = names if any(c for chans in channels.values() for c in chans) else []
    for f in orphans:
        found.problems.append(_orphan(f, names, label_dir.name, found))
    for case_id, label in labels.items():
        _add_case(found, case_id, label, channels.get(case_id, {}), names, image_dir)


def _files(found: Layout, folder: Path) -> list[Path]:
    """The image or label files of `folder`, sorted; a symbolic link that leads nowhere (a loop, or a
    missing target) is a problem of its own instead (os.stat on it would raise ELOOP or ENOENT)."""
    files = []
    for f in sorted(folder.iterdir()):
        if strip_suffix(f.name, found.endings) is None:
            continue
        why = link_problem(f)
        if why:
            rel = _rel(f, found.root)
            stem = strip_suffix(f.name, found.endings)
            found.problems.append(CaseReport(stem, [rel], problems=[f"{rel}: {why}"]))
        else:
            files.append(f)
    return files


def link_problem(path: Path) -> str | None:
    """Why `path` cannot be read although its name is there (a symbolic link loop or a dangling link), or
    None. Path.exists() reads both as "no such file", which hides the cause."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself); remove or fix the link"
        if os.path.islink(path):
            return f"symbolic link to {os.readlink(path)}, which does not exist"
    return None


def _two_files(found: Layout, case_id: str, first: Path, second: Path) -> None:
    """Two files of one case in one folder that differ only in their ending (c0.nii and c0.nii.gz): which
    one is the case is not known, so neither is guessed."""
    a, b = _rel(first, found.root), _rel(second, found.root)
    problem = f"{b}: same case as {a} (case id {case_id}); keep one of the two files"
    found.problems.append(CaseReport(case_id, [a, b], problems=[problem]))


def unique_ids(found: Layout) -> None:
    """Give every case a distinct id (docs/design.md §8, "Case ids").

    An id is the label file's name without its ending. Where two different label files share that name
    (two sites: `siteA/labelsTr/c0`, `siteB/labelsTr/c0`), each of them takes its path relative to the data
    folder instead (`siteA/labelsTr/c0`), so neither case hides the other in the splits or the cache. The same
    label file listed twice (dataset.json) is one case: the repeated entries are problems naming both.
    """
    by_id: dict[str, list[CaseFiles]] = {}
    for case in found.cases:
        by_id.setdefault(case.id, []).append(case)
    kept, seen = [], {}
    for case in found.cases:
        label = os.path.normcase(os.path.abspath(case.label))
        if label in seen:
            first = seen[label]
            files = [_rel(p, found.root) for p in (first.label, case.label)]
            why = f"{files[1]}: listed twice in dataset.json (case id {first.id}); list each case once"
            found.problems.append(CaseReport(first.id, files, problems=[why]))
            continue
        seen[label] = case
        if len({os.path.normcase(os.path.abspath(c.label)) for c in by_id[case.id]}) > 1:
            rel = _rel(case.label, found.root)
            case.id = rel[: len(rel) - len(_suffix(case.label.name, found.endings))].replace(os.sep, "/")
        kept.append(case)
    found.cases = kept


def _orphan(image: Path, channel_names: list[str], label_dir: str, found: Layout) -> CaseReport:
    """The report of an image whose label map is missing (its expected name, channel suffix removed)."""
    stem = strip_suffix(image.name, found.endings)
    match = CHANNEL.match(stem)
    if match and (match["channel"].isdigit() or match["channel"] in channel_names):
        stem = match["case"]
    expected = f"{label_dir}/{stem}{_suffix(image.name, found.endings)}"
    rel = _rel(image, found.root)
    return CaseReport(stem, [rel], problems=[f"{rel}: image without a label (expected {expected})"])


def _add_case(
    found: Layout, case_id: str, label: Path, chans: dict, names: list[str], image_dir: Path
) -> None:
    """One case of a scanned folder: its single image, or its channel images in `names` order."""
    root, files = found.root, [_rel(p, found.root) for p in [*chans.values(), label]]
    suffix = _suffix(label.name, found.endings)
    if not chans:
        problem = f"{_rel(label, root)}: label without an image (expected {image_dir.name}/{case_id}{suffix})"
        found.problems.append(CaseReport(case_id, files, problems=[problem]))
    elif None in chans and len(chans) > 1:
        problem = f"{_rel(chans[None], root)}: both a single image and per-channel images {case_id}_*{suffix}"
        found.problems.append(CaseReport(case_id, files, problems=[problem]))
    elif None in chans:
        found.cases.append(CaseFiles(case_id, [chans[None]], label))
    else:
        missing = [f"{image_dir.name}/{case_id}_{n}{suffix}" for n in names if n not in chans]
        if missing:
            found.problems.append(
                CaseReport(case_id, files, problems=[f"{m}: channel image not found" for m in missing])
            )
        else:
            found.cases.append(CaseFiles(case_id, [chans[n] for n in names], label))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
