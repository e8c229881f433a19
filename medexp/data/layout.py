"""Find the cases of a data folder: which image file(s) and which label map make up each case.

Layouts, tried in this order:
- a `dataset.json` with a "training" list of {"image", "label"} (Medical Segmentation Decathlon, nnU-Net v1);
  an image may be one 4D file of all modalities (MSD) or per-modality files `<case>_0000.nii.gz`, ...;
- `imagesTr/` + `labelsTr/` or `images/` + `labels/`: a label `<case>.nii.gz` goes with the image
  `<case>.nii.gz`, or with several images `<case>_<channel>.nii.gz` (nnU-Net `_0000`, `_0001`, ..., or names
  such as `_t1`, `_flair` listed in `dataset.modalities`), one input channel each.
Label names come from `dataset.json` "labels" ({"0": "background", ...} or nnU-Net v2 {"background": 0, ...}).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from medexp.data.base import DataError
from medexp.data.check import CaseReport
from medexp.data.images2d import SUFFIXES_2D

SUFFIXES_3D = (".nii.gz", ".nii")
IMAGE_DIRS = ("imagesTr", "images")
LABEL_DIRS = ("labelsTr", "labels")
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>[^_]+)$")


@dataclass
class CaseFiles:
    """The files of one case: one image per channel (or one 4D image) and a label map."""

    id: str
    images: list[Path]
    label: Path


@dataclass
class Layout:
    """What `discover` found in a data folder.

    Attributes:
        root: the data folder.
        name: dataset.json "name" or the folder name.
        cases: complete cases.
        problems: files that do not make a case (an image without a label, ...), one report each.
        labels: {value: name} from dataset.json, if it has labels.
        channel_names: modality names (dataset.json "modality"/"channel_names", or the channel suffixes).
        channels_4d: channels one 4D image may hold (the number of MSD modalities), 1 if 4D is not expected.
    """

    root: Path
    name: str
    cases: list[CaseFiles] = field(default_factory=list)
    problems: list[CaseReport] = field(default_factory=list)
    labels: dict[int, str] | None = None
    channel_names: list[str] = field(default_factory=list)
    channels_4d: int = 1


def strip_suffix(name: str) -> str | None:
    """File name without its image suffix (".nii.gz", ".png", ...), or None for other files."""
    low = name.lower()
    for suffix in SUFFIXES_3D + SUFFIXES_2D:
        if low.endswith(suffix) and not name.startswith("."):
            return name[: -len(suffix)]
    return None


def _suffix(name: str) -> str:
    stem = strip_suffix(name)
    return name[len(stem) :] if stem is not None else ""


def discover(root: str | None, layout: str = "auto", modalities: list[str] | None = None) -> Layout:
    """The cases of the folder `root`.

    Args:
        root: data folder (read only).
        layout: "auto" (dataset.json training list if there is one, else folders), "msd" (needs dataset.json)
            or "folders" (ignore a dataset.json training list).
        modalities: channel suffixes in input-channel order, e.g. ["t1", "flair"]; None = all found, sorted.

    Returns:
        the Layout; files that do not make a case are in `.problems` (all of them, not just the first).

    Raises:
        DataError: root unset or missing, no cases at all.
    """
    if root is None or str(root).strip() in ("", "???"):
        raise DataError(
            "dataset.root is not set: give the folder of your data, e.g. dataset.root=/data/brains"
        )
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset.root={root}: folder not found")
    manifest = _read_manifest(path / "dataset.json")
    training = manifest.get("training")
    if layout == "msd" and not training:
        raise DataError(
            f"{path / 'dataset.json'}: missing or without a 'training' list (needed by dataset=msd)"
        )
    found = Layout(root=path, name=str(manifest.get("name") or path.name))
    names = manifest.get("modality") or manifest.get("channel_names") or {}
    found.channel_names = [str(names[k]) for k in sorted(names, key=lambda k: int(k))] if names else []
    if manifest.get("labels"):
        found.labels = parse_labels(manifest["labels"], f"{path / 'dataset.json'} labels")
    if training and layout != "folders":
        found.channels_4d = max(1, len(found.channel_names))
        _from_manifest(found, training)
    else:
        _scan(found, modalities)
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
            if not image.exists() and not channels:
                problems.append(f"{_rel(image, found.root)}: listed in dataset.json but not found")
        if not label.exists():
            problems.append(f"{_rel(label, found.root)}: listed in dataset.json but not found")
        if problems:
            found.problems.append(
                CaseReport(case_id, [_rel(p, found.root) for p in [*images, label]], problems=problems)
            )
        else:
            found.cases.append(CaseFiles(case_id, images, label))


def _scan(found: Layout, modalities: list[str] | None) -> None:
    """Cases from images/ + labels/ (or imagesTr/ + labelsTr/) with matching names."""
    root = found.root
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    label_dir = next((root / d for d in LABEL_DIRS if (root / d).is_dir()), None)
    if image_dir is None or label_dir is None:
        raise DataError(f"{root}: no image/label pairs found: {_EXPECTED}")
    labels = {
        strip_suffix(f.name): f for f in sorted(label_dir.iterdir()) if strip_suffix(f.name) is not None
    }
    channels: dict[str, dict[str | None, Path]] = {}
    orphans: list[Path] = []
    for f in sorted(image_dir.iterdir()):
        stem = strip_suffix(f.name)
        match = CHANNEL.match(stem or "")
        if stem in labels:
            channels.setdefault(stem, {})[None] = f
        elif match and match["case"] in labels:
            channels.setdefault(match["case"], {})[match["channel"]] = f
        elif stem is not None:
            orphans.append(f)
    names = list(modalities) if modalities else sorted({c for chans in channels.values() for c in chans if c})
    found.channel_names = found.channel_names or names
    for f in orphans:
        found.problems.append(_orphan(f, names, label_dir.name, root))
    for case_id, label in labels.items():
        _add_case(found, case_id, label, channels.get(case_id, {}), names, image_dir)


def _orphan(image: Path, channel_names: list[str], label_dir: str, root: Path) -> CaseReport:
    """The report of an image whose label map is missing (its expected name, channel suffix removed)."""
    stem = strip_suffix(image.name)
    match = CHANNEL.match(stem)
    if match and (match["channel"].isdigit() or match["channel"] in channel_names):
        stem = match["case"]
    expected = f"{label_dir}/{stem}{_suffix(image.name)}"
    return CaseReport(
        stem,
        [_rel(image, root)],
        problems=[f"{_rel(image, root)}: image without a label (expected {expected})"],
    )


def _add_case(
    found: Layout, case_id: str, label: Path, chans: dict, names: list[str], image_dir: Path
) -> None:
    """One case of a scanned folder: its single image, or its channel images in `names` order."""
    root, files = found.root, [_rel(p, found.root) for p in [*chans.values(), label]]
    suffix = _suffix(label.name)
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


def _int_like(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (
        isinstance(x, str) and re.fullmatch(r"-?\d+", x.strip())
    )


def parse_labels(spec, where: str = "dataset.labels") -> dict[int, str]:
    """{label value: class name} from a list of names (value = position), {value: name} or {name: value}.

    Several values may share a name: they become one class.

    Raises:
        DataError: naming `where` if the spec is neither.
    """
    if isinstance(spec, (list, tuple)):
        return {i: str(n) for i, n in enumerate(spec)}
    if isinstance(spec, dict) and spec:
        if all(_int_like(k) for k in spec):
            return {int(k): str(v) for k, v in spec.items()}
        if all(_int_like(v) for v in spec.values()):
            return {int(v): str(k) for k, v in spec.items()}
    raise DataError(
        f"{where}: expected {{value: name}} pairs such as {{0: background, 1: tumour}}, got {spec}"
    )


def class_table(value_names: dict[int, str]) -> tuple[dict[int, int], list[str]]:
    """Classes from {value: name}: value 0 is background (class 0), then one class per distinct name.

    Returns:
        ({value: class index}, [class names, background first]).
    """
    value_names = {0: "background", **value_names}
    names: list[str] = []
    lut: dict[int, int] = {}
    for value in sorted(value_names, key=lambda v: (v != 0, v)):
        name = value_names[value]
        if name not in names:
            names.append(name)
        lut[value] = names.index(name)
    return lut, names
