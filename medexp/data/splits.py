"""Train/validation/test splits (Wong & Moradi 3.1): n shuffles of the cases, 60/10/30 each by default.

Splits are deterministic from the seed and the case ids and are saved as JSON next to the data, so
every run of a split - in any process, on any node - sees the same cases.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from medexp.data.cache_io import write_json
from medexp.errors import ConfigError, DataError

RATIOS = (0.6, 0.1, 0.3)
MAX_SPLITS = 1000  # each split is a stored shuffle of every case id: 1000 of 1000 cases is ~10 MB of JSON


def split_ratios(cfg) -> tuple[float, float, float]:
    """A run config's `split_ratios` (configs of runs made before the key existed: 60/10/30)."""
    return tuple(float(r) for r in cfg.get("split_ratios", RATIOS))


def part_sizes(num_cases: int, ratios: tuple[float, float, float] = RATIOS) -> tuple[int, int, int]:
    """(train, val, test) sizes; validation and test keep at least one case each, train the rest."""
    if num_cases < 3:
        raise DataError(f"{num_cases} case(s) cannot be split into train/val/test: need at least 3")
    n_val = max(1, round(num_cases * ratios[1]))
    n_test = max(1, round(num_cases * ratios[2]))
    return num_cases - n_val - n_test, n_val, n_test


def check_n_splits(
    n_splits: int, num_cases: int | None = None, ratios: tuple[float, float, float] = RATIOS
) -> None:
    """n_splits is at most MAX_SPLITS and, given the cases, at most the number of distinct train/val/test
    splits they have, n! / (n_train! n_val! n_test!): more shuffles than that can only repeat splits.

    Raises:
        ConfigError: naming n_splits, its value and the bound.
    """
    if n_splits > MAX_SPLITS:
        raise ConfigError(
            f"n_splits={n_splits}: expected at most {MAX_SPLITS} splits (shuffles of the cases)"
        )
    if num_cases is None:
        return
    n_train, n_val, _ = part_sizes(num_cases, ratios)
    distinct = math.comb(num_cases, n_train) * math.comb(num_cases - n_train, n_val)
    if n_splits > distinct:
        raise ConfigError(
            f"n_splits={n_splits}: {num_cases} cases have only {distinct} distinct train/val/test splits "
            f"at split_ratios={list(ratios)}; expected n_splits <= {distinct}"
        )


def check_unique_ids(cases: list[dict]) -> None:
    """Every case id once: a repeated id would put one case in two parts of a split (a test case trained on)
    and make one hide the other wherever cases are looked up by id.

    Raises:
        DataError: the first repeated id and the image files of its cases.
    """
    counts = Counter(str(c["id"]) for c in cases)
    repeated = next((i for i, n in counts.items() if n > 1), None)
    if repeated is not None:
        files = ", ".join(str(c["image"]) for c in cases if str(c["id"]) == repeated)
        raise DataError(
            f"case id {repeated!r} names {counts[repeated]} cases ({files}); case ids must be unique"
        )


def make_splits(
    case_ids: list[str], n_splits: int = 5, seed: int = 0, ratios: tuple[float, float, float] = RATIOS
) -> list[dict[str, list[str]]]:
    """n_splits independent shuffles of the sorted case ids, each cut into train/val/test by `ratios`."""
    repeated = [i for i, n in Counter(case_ids).items() if n > 1]
    if repeated:
        raise DataError(
            f"case id {repeated[0]!r} occurs {case_ids.count(repeated[0])} times; ids must be unique"
        )
    ids = sorted(case_ids)
    check_n_splits(n_splits, len(ids), ratios)
    n_train, n_val, _ = part_sizes(len(ids), ratios)
    splits = []
    for k in range(n_splits):
        order = np.random.default_rng([seed, k]).permutation(len(ids))
        shuffled = [ids[i] for i in order]
        splits.append(
            {
                "train": sorted(shuffled[:n_train]),
                "val": sorted(shuffled[n_train : n_train + n_val]),
                "test": sorted(shuffled[n_train + n_val :]),
            }
        )
    return splits


def load_or_make_splits(
    folder: str | Path,
    case_ids: list[str],
    n_splits: int = 5,
    seed: int = 0,
    ratios: tuple[float, float, float] = RATIOS,
) -> list[dict]:
    """Read folder/splits-<n>-seed<seed>[-<ratios>].json if it matches the cases, else make and save it
    atomically. The default ratios keep the file name they always had."""
    ratios = tuple(float(r) for r in ratios)
    tag = "" if ratios == RATIOS else "-" + "-".join(f"{r:g}" for r in ratios)
    path = Path(folder) / f"splits-{n_splits}-seed{seed}{tag}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if sorted(saved["case_ids"]) == sorted(case_ids):
            return saved["splits"]
    splits = make_splits(case_ids, n_splits, seed, ratios)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"case_ids": sorted(case_ids), "splits": splits})  # per-process temp file, then rename
    return splits


def select(cases: list[dict], splits: list[dict], split: int) -> dict[str, list[dict]]:
    """The cases of split `split`: {"train": [...], "val": [...], "test": [...]}."""
    if not 0 <= split < len(splits):
        raise DataError(f"split={split} is out of range: allowed 0..{len(splits) - 1}")
    by_id = {c["id"]: c for c in cases}
    return {part: [by_id[i] for i in ids] for part, ids in splits[split].items()}
