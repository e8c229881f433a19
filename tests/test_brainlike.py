"""The brain-like data (medexp.data.brainlike): Table 1a's label sizes, brain-like nesting and T1 contrast,
and the dataset as the runner reads it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medexp.data.brainlike import LABEL_NAMES, TABLE_1A, BrainlikeDataset, label_fractions, make_brain
from medexp.data.loaders import make_loader
from medexp.errors import DataError

# Wong & Moradi Table 1a, typed in from the paper (% of the labelled volume), label 1..19.
PAPER = [50.24, 0.09, 0.15, 1.46, 0.39, 0.19, 0.26, 0.07, 0.21, 0.54, 8.19, 2.06, 31.23, 0.58, 0.09, 2.11]
PAPER += [0.25, 0.73, 1.19]


@pytest.fixture(scope="module")
def brains():
    return [make_brain(np.random.default_rng([0, i]), (64, 64, 64)) for i in range(2)]


def test_label_sizes_follow_table_1a(brains):
    assert [TABLE_1A[k][1] for k in range(1, 20)] == PAPER
    mean = np.mean([[label_fractions(label)[k] for k in range(1, 20)] for _, label in brains], axis=0)
    assert mean.sum() == pytest.approx(100.0)
    for k, (got, want) in enumerate(zip(mean, PAPER, strict=True), start=1):
        assert abs(math.log(got / want)) < math.log(1.5), (LABEL_NAMES[k], got, want)
    assert list(np.argsort(mean)[-3:] + 1) == [11, 13, 1], "cerebellar grey < cerebral white < cerebral grey"
    assert mean.max() / mean.min() > 300, "three orders of magnitude, as 50.24% vs 0.07%"


def test_nesting_and_t1_contrast(brains):
    for image, label in brains:
        touches_background = ndimage.binary_dilation(label == 0)
        for inner in ("cerebral_white", "lateral_ventricle", "thalamus", "3rd_ventricle", "cerebellar_white"):
            k = LABEL_NAMES.index(inner)
            assert (label == k).any() and not ((label == k) & touches_background).any(), inner
        mean = {name: image[label == LABEL_NAMES.index(name)].mean() for name in LABEL_NAMES[1:]}
        assert mean["cerebral_white"] > mean["thalamus"] > mean["putamen"] > mean["cerebral_grey"]
        assert mean["cerebral_grey"] > mean["lateral_ventricle"] + 0.2
        assert abs(mean["hippocampus"] - mean["cerebral_grey"]) < 0.1, "told apart by position, not contrast"


def test_dataset_writes_cases_the_loaders_read(tmp_path):
    dataset = BrainlikeDataset(root=str(tmp_path), num_cases=3, shape=[16, 32, 16], seed=1)
    cases = dataset.prepare()
    assert [c["id"] for c in cases] == ["case_000", "case_001", "case_002"]
    info = dataset.info
    assert info.num_classes == 20 and info.label_names == LABEL_NAMES and info.label_names[8] == "accumbens"
    assert info.spacing == [12.5, 6.25, 12.5]  # 200 mm field of view
    batch = next(iter(make_loader(cases, batch_size=1, train=False)))
    assert tuple(batch["image"].shape) == (1, 1, 16, 32, 16) and int(batch["label"].max()) <= 19
    again = BrainlikeDataset(root=str(tmp_path / "again"), num_cases=3, shape=[16, 32, 16], seed=1).prepare()
    second = next(iter(make_loader(again, batch_size=1, train=False)))
    assert np.array_equal(batch["label"].numpy(), second["label"].numpy()), "same seed, same case"
    with pytest.raises(DataError, match="3D"):
        BrainlikeDataset(root=str(tmp_path), shape=[32, 32])
