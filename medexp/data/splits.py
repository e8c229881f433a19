"""Train/validation/test splits (Wong & Moradi 3.1): n shuffles of the cases, 60/10/30 each by default.

Splits are deterministic from the seed and the case ids and are saved as JSON next to the data, so
every run of a split - in any process, on any node - sees the same cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medexp.data.cache_io import write_json
from medexp.errors import DataError

RATIOS = (0.6, 0.1, 0.3)


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


def make_splits(
    case_ids: list[str], n_splits: int = 5, seed: int = 0, ratios: tuple[float, float, float] = RATIOS
) -> list[dict[str, list[str]]]:
    """n_splits independent shuffles of the sorted case ids, each cut into train/val/test by `ratios`."""
    ids = sorted(case_ids)
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
