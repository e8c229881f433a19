"""Demo data and splits (docs/design.md §8)."""

import json

import numpy as np
import pytest
from scipy import ndimage

from medexp.data.demo import DemoDataset, make_case
from medexp.data.splits import load_or_make_splits, make_splits, part_sizes, select
from medexp.errors import DataError


def test_demo_case_is_deterministic_and_has_very_different_label_sizes():
    a = make_case(np.random.default_rng([0, 3]), (32, 32, 32), 6, 0.1)
    b = make_case(np.random.default_rng([0, 3]), (32, 32, 32), 6, 0.1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    fractions = np.bincount(a[1].ravel(), minlength=6) / a[1].size
    assert (fractions > 0).all(), "every label is present"
    assert fractions[1] > 0.1, "a large structure (>10% of the volume)"
    blobs, count = ndimage.label(a[1] == 5)
    sizes = np.bincount(blobs.ravel())[1:] / a[1].size
    assert 1 <= count <= 3 and sizes.max() < 0.002, "tiny structures: blobs of < 0.2% of the volume each"
    assert fractions[1] / sizes.max() > 100, "two orders of magnitude from the largest to a tiny structure"


def test_demo_dataset_writes_nifti_once(tmp_path):
    ds = DemoDataset(root=str(tmp_path), num_cases=4, num_classes=3, shape=[16, 16, 16])
    cases = ds.prepare()
    assert [c["id"] for c in cases] == ["case_000", "case_001", "case_002", "case_003"]
    stamp = (ds.folder / "dataset.json").stat().st_mtime_ns
    assert DemoDataset(root=str(tmp_path), num_cases=4, num_classes=3, shape=[16, 16, 16]).prepare() == cases
    assert (ds.folder / "dataset.json").stat().st_mtime_ns == stamp
    assert json.loads((ds.folder / "dataset.json").read_text())["labels"]["0"] == "background"


@pytest.mark.parametrize(("n", "sizes"), [(20, (12, 2, 6)), (10, (6, 1, 3)), (8, (5, 1, 2)), (3, (1, 1, 1))])
def test_part_sizes_60_10_30_with_at_least_one_each(n, sizes):
    assert part_sizes(n) == sizes


def test_too_few_cases_is_a_clear_error():
    with pytest.raises(DataError, match="2 case"):
        part_sizes(2)


def test_splits_are_disjoint_deterministic_and_saved(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    splits = make_splits(ids, n_splits=5, seed=0)
    assert splits == make_splits(list(reversed(ids)), n_splits=5, seed=0)
    assert len({tuple(s["test"]) for s in splits}) > 1, "different shuffles"
    for s in splits:
        assert sorted(s["train"] + s["val"] + s["test"]) == sorted(ids)
    assert load_or_make_splits(tmp_path, ids) == splits
    saved = next(tmp_path.glob("splits-*.json"))
    assert json.loads(saved.read_text())["splits"] == splits
    cases = [{"id": i} for i in ids]
    assert [c["id"] for c in select(cases, splits, 2)["val"]] == splits[2]["val"]
    with pytest.raises(DataError, match="split=7.*0..4"):
        select(cases, splits, 7)


@pytest.mark.parametrize(("n", "sizes"), [(60, (42, 6, 12)), (154, (108, 15, 31))])
def test_nerd_split_ratios_give_the_papers_counts(n, sizes):
    # Zhang et al. Sec. 3.1: WMH 42/6/12 of 60 volumes, LA 108/15/31 of 154 (conf/experiment/nerd.yaml)
    assert part_sizes(n, (0.7, 0.1, 0.2)) == sizes


def test_other_split_ratios_are_saved_apart_from_the_default_ones(tmp_path):
    ids = [f"c{i}" for i in range(20)]
    default = load_or_make_splits(tmp_path, ids)
    other = load_or_make_splits(tmp_path, ids, ratios=(0.7, 0.1, 0.2))
    assert [len(default[0][p]) for p in ("train", "val", "test")] == [12, 2, 6]
    assert [len(other[0][p]) for p in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(p.name for p in tmp_path.glob("splits-*.json")) == [
        "splits-5-seed0-0.7-0.1-0.2.json",
        "splits-5-seed0.json",
    ]


@pytest.mark.parametrize("ratios", ["[0.6,0.1]", "[0.7,0.1,0.3]", "[0.9,0.1,0]"])
def test_split_ratios_must_be_three_positive_fractions_summing_to_one(ratios):
    from medexp.config.compose import compose_config
    from medexp.config.validate import validate
    from medexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^split_ratios=.*: expected three positive fractions"):
        validate(compose_config([f"split_ratios={ratios}"]))
