"""Label maps' values and the classes a network predicts.

A dataset names its label values ({value: name}, from `dataset.labels` or `dataset.json`); values that share
a name become one class, value 0 is the background (class 0), and a value named `ignore` (nnU-Net v2's
ignore label, for partly annotated images) is no class at all: its voxels get IGNORE_INDEX and are left out
of every loss and metric (medexp.data.ignore). Region labels (nnU-Net v2's `"whole tumour": [1, 2, 3]`,
trained there with one sigmoid per region) have no place in one-softmax-class-per-value training; they are
refused with one line that says which `dataset.labels` to give instead.
"""

from __future__ import annotations

import re

from medexp.errors import DataError

IGNORE_INDEX = 255  # class index of ignored voxels in the (uint8) preprocessed label maps
IGNORE_NAME = "ignore"  # nnU-Net v2's name for it


def _int_like(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or bool(
        isinstance(x, str) and re.fullmatch(r"-?\d+", x.strip())
    )


def region_labels(spec) -> dict[str, list[int]]:
    """The region entries ({name: [values]}) of a dataset.json `labels` spec; empty if it has none."""
    if not isinstance(spec, dict):
        return {}
    return {
        str(k): [int(x) for x in v]
        for k, v in spec.items()
        if isinstance(v, (list, tuple)) and all(_int_like(x) for x in v)
    }


def refuse_regions(spec, where: str) -> None:
    """Raise a one-line DataError when `spec` has region labels, naming the `dataset.labels` to give."""
    regions = region_labels(spec)
    if not regions:
        return
    named = {int(v): str(k) for k, v in spec.items() if _int_like(v)}
    values = sorted({0, *named, *(x for xs in regions.values() for x in xs)})
    simple = {v: n for v, n in named.items() if re.fullmatch(r"[A-Za-z_][\w-]*", n)}
    suggestion = ",".join(f"{v}:{simple.get(v, 'background' if v == 0 else f'label{v}')}" for v in values)
    first = next(iter(regions.items()))
    raise DataError(
        f"{where}: region label {first[0]!r}: {first[1]} (nnU-Net region-based training, one sigmoid per "
        f"region) is not supported; medexp trains one class per label value: give them, e.g. "
        f"dataset.labels={{{suggestion}}}"
    )


def parse_labels(spec, where: str = "dataset.labels") -> dict[int, str]:
    """{label value: class name} from a list of names (value = position), {value: name} or {name: value}.

    Several values may share a name: they become one class. A value named "ignore" is the ignore label.

    Raises:
        DataError: naming `where` if the spec is neither, or has region labels (see refuse_regions).
    """
    if isinstance(spec, (list, tuple)):
        return {i: str(n) for i, n in enumerate(spec)}
    refuse_regions(spec, where)
    if isinstance(spec, dict) and spec:
        if all(_int_like(k) for k in spec):
            return {int(k): str(v) for k, v in spec.items()}
        if all(_int_like(v) for v in spec.values()):
            return {int(v): str(k) for k, v in spec.items()}
    raise DataError(
        f"{where}: expected {{value: name}} pairs such as {{0: background, 1: tumour}}, got {spec}"
    )


def class_table(value_names: dict[int, str]) -> tuple[dict[int, int], list[str]]:
    """Classes from {value: name}: value 0 is background (class 0), then one class per distinct name; values
    named "ignore" map to IGNORE_INDEX and make no class.

    Returns:
        ({value: class index}, [class names, background first]).
    """
    value_names = {0: "background", **value_names}
    names: list[str] = []
    lut: dict[int, int] = {}
    for value in sorted(value_names, key=lambda v: (v != 0, v)):
        name = value_names[value]
        if name == IGNORE_NAME and value != 0:
            lut[value] = IGNORE_INDEX
            continue
        if name not in names:
            names.append(name)
        lut[value] = names.index(name)
    if len(names) >= IGNORE_INDEX:
        raise DataError(f"dataset labels: {len(names)} classes; at most {IGNORE_INDEX - 1} are supported")
    return lut, names


def class_values(lut: dict[int, int], num_classes: int) -> list[int]:
    """The value each class is written as in a predicted label map: the smallest value mapped to it."""
    values = [min((v for v, c in lut.items() if c == k), default=k) for k in range(num_classes)]
    return [0, *values[1:]]


def ignore_value(lut: dict[int, int]) -> int | None:
    """The label-file value of the ignore label, if the table has one (the smallest, if several)."""
    return min((v for v, c in lut.items() if c == IGNORE_INDEX), default=None)
