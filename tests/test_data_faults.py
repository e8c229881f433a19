"""Data faults (docs/faults.md, "Data"): case ids that collide, sizes nobody checked, symbolic link loops,
bounds on n_splits and names. Each test has a control showing the fault is live without the guard."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_nifti import make_folder, phantom, save

from medexp.commands.data_check import run_check
from medexp.data.layout import discover, strip_suffix
from medexp.data.nifti import NiftiDataset
from medexp.data.reading import read_images, volume_reader
from medexp.data.sizes import DEFAULT_MAX_VOXELS, Header, preprocessed_shape, read_header, resampled_shape
from medexp.data.splits import check_n_splits, check_unique_ids, make_splits
from medexp.data.transforms import preprocess_case
from medexp.errors import ConfigError, DataError

LABELS = {"0": "background", "1": "blob", "2": "corner"}


def two_sites(root: Path, n: int = 3) -> list[dict]:
    """siteA/ and siteB/, each with imagesTr/c0.. and labelsTr/c0.. (one file stem per case at both sites),
    all listed in dataset.json; returns the training list."""
    training = []
    for s, site in enumerate(("siteA", "siteB")):
        for i in range(n):
            image, label = phantom((10 + 2 * s + i, 12, 8), 10 * s + i)  # every case its own shape
            save(root / site / "imagesTr" / f"c{i}.nii.gz", image, np.float32, np.eye(4))
            save(root / site / "labelsTr" / f"c{i}.nii.gz", label, np.uint8, np.eye(4))
            training.append(
                {"image": f"{site}/imagesTr/c{i}.nii.gz", "label": f"{site}/labelsTr/c{i}.nii.gz"}
            )
    (root / "dataset.json").write_text(json.dumps({"labels": LABELS, "training": training}))
    return training


def check(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "dataset=nifti",
        f"dataset.root={data}",
        "dataset.shape=[16,16,16]",
        f"dataset.cache_dir={tmp_path}/c",
        *extra,
    ]


def problems(data: Path, tmp_path: Path, **options) -> list[str]:
    """Every problem line `medexp data check` prints (its table wraps them), from the same reports."""
    ds = NiftiDataset(root=str(data), shape=[16, 16, 16], cache_dir=str(tmp_path / "c"), **options)
    return [p for r in ds.inspect()[0] for p in r.problems]


def test_one_stem_at_two_sites_gives_six_cases_six_cache_files(tmp_path, capsys):
    training = two_sites(tmp_path / "data")
    stems = {strip_suffix(Path(e["label"]).name) for e in training}
    assert len(training) == 6 and len(stems) == 3, "control: by file stem, 3 of the 6 cases collide"
    assert run_check(check(tmp_path / "data", tmp_path)) == 0
    assert "all 6 case(s) usable" in capsys.readouterr().out
    ds = NiftiDataset(root=str(tmp_path / "data"), shape=[16, 16, 16], cache_dir=str(tmp_path / "c"))
    cases = ds.prepare()
    expected = {f"{site}/labelsTr/c{i}" for site in ("siteA", "siteB") for i in range(3)}
    assert {c["id"] for c in cases} == expected
    assert len({c["image"] for c in cases}) == 6 and len({c["label"] for c in cases}) == 6, "no shared file"
    record_files = sorted((Path(ds.info.root) / "cases").glob("*.json"))
    shapes = sorted(json.loads(p.read_text())["original"]["shape"][0] for p in record_files)
    assert shapes == [10, 11, 12, 12, 13, 14], "each record holds its own case (x sizes 10 + 2s + i)"
    for split in make_splits(sorted(expected), n_splits=5):
        parts = [set(ids) for ids in split.values()]
        assert sum(len(p) for p in parts) == 6 and set.union(*parts) == expected, "each case in one part"


def test_a_case_listed_twice_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    training = two_sites(data)[:3]  # siteA only: c0, c1, c2
    (data / "dataset.json").write_text(json.dumps({"labels": LABELS, "training": training}))
    assert run_check(check(data, tmp_path)) == 0, "control: each case listed once"
    capsys.readouterr()
    (data / "dataset.json").write_text(json.dumps({"labels": LABELS, "training": [*training, training[1]]}))
    line = "siteA/labelsTr/c1.nii.gz: listed twice in dataset.json (case id c1); list each case once"
    assert run_check(check(data, tmp_path)) == 1
    assert problems(data, tmp_path) == [line]
    with pytest.raises(DataError, match="listed twice in dataset.json") as err:
        NiftiDataset(root=str(data), shape=[16, 16, 16], cache_dir=str(tmp_path / "c")).prepare()
    assert "\n" not in str(err.value)


def test_two_files_of_one_case_in_one_folder_are_refused(tmp_path):
    data = make_folder(tmp_path / "data", 4)
    shutil.copy(data / "labels" / "case0.nii.gz", data / "labels" / "case0.nii")
    files = sorted((data / "labels").iterdir())
    assert len({strip_suffix(f.name): f for f in files}) == len(files) - 1, "control: one replaces the other"
    found = discover(str(data))
    (problem,) = [p for r in found.problems for p in r.problems]
    assert (
        problem
        == "labels/case0.nii.gz: same case as labels/case0.nii (case id case0); keep one of the two files"
    )


def test_repeated_ids_are_refused_at_split_time():
    cases = [
        {"id": "c0", "image": "a/c0.nii"},
        {"id": "c1", "image": "c1.nii"},
        {"id": "c0", "image": "b/c0.nii"},
    ]
    assert len({c["id"]: c for c in cases}) == 2, "control: looked up by id, one c0 hides the other"
    with pytest.raises(
        DataError, match=r"^case id 'c0' names 2 cases \(a/c0.nii, b/c0.nii\); case ids must be unique$"
    ):
        check_unique_ids(cases)
    with pytest.raises(DataError, match="case id 'c0' occurs 2 times"):
        make_splits(["c0", "c1", "c2", "c0"], n_splits=1)
    check_unique_ids(cases[:2] + [{"id": "c2", "image": "b/c0.nii"}])  # control: distinct ids pass


def test_n_splits_is_bounded_before_any_split_is_made():
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^n_splits=30000000: expected at most 1000 splits"):
        make_splits([f"c{i}" for i in range(10)], n_splits=30_000_000)
    assert time.perf_counter() - started < 1.0, "refused before the loop (it used to run 109 s)"
    # 3 cases at 60/10/30 are cut 1/1/1: 3! / (1! 1! 1!) = 6 distinct splits; 10 cases 6/1/3: C(10,6) C(4,1)
    check_n_splits(6, 3)
    with pytest.raises(ConfigError, match=r"3 cases have only 6 distinct train/val/test splits"):
        check_n_splits(7, 3)
    check_n_splits(840, 10)
    with pytest.raises(ConfigError, match="expected n_splits <= 840"):
        check_n_splits(841, 10)


def coarse_folder(root: Path, zoom: float = 100.0) -> Path:
    """4 nnU-Net cases; case0 is 16^3 voxels of `zoom` mm."""
    make_folder(root, 4, "nnunet")
    image, label = phantom((16, 16, 16), 0)
    save(root / "imagesTr" / "case0_0000.nii.gz", image, np.float32, np.diag([zoom, zoom, zoom, 1.0]))
    save(root / "labelsTr" / "case0.nii.gz", label, np.uint8, np.diag([zoom, zoom, zoom, 1.0]))
    return root


def test_voxels_that_resampling_would_blow_up_are_refused_from_the_header(tmp_path, capsys):
    data = coarse_folder(tmp_path / "data")
    # by hand: 1 mm over 15 voxel gaps of 100 mm is 1500 gaps, 1501 voxels per axis; a cube needs no padding
    line = (
        "imagesTr/case0_0000.nii.gz: resampled to 1.0 mm and padded 1501x1501x1501 = 3,381,754,501 voxels, "
        f"over dataset.max_voxels={DEFAULT_MAX_VOXELS:,}"
    )
    assert run_check(check(data, tmp_path)) == 1
    (found,) = problems(data, tmp_path)
    assert found.startswith(line), found
    with pytest.raises(DataError, match="1501x1501x1501 = 3,381,754,501 voxels"):
        NiftiDataset(root=str(data), shape=[16, 16, 16], cache_dir=str(tmp_path / "c")).prepare()
    kept = NiftiDataset(root=str(data), shape=[16, 16, 16], spacing=None, cache_dir=str(tmp_path / "c"))
    assert len(kept.prepare()) == 4, "control: the same folder on its own grid (16^3) is fine"
    assert run_check(check(data, tmp_path, "dataset.max_voxels=4000000000")) == 0, "a raised limit admits it"


def test_the_size_estimate_matches_monai_within_one_voxel(tmp_path):
    """resampled_shape never under-estimates MONAI's Spacing, and is at most one voxel larger per axis."""
    affine = np.array([[0, -1.1, 0, 30.0], [0.9, 0, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])  # permuted
    for shape, spacing in [((19, 17, 9), 1.0), ((23, 17, 8), 2.0), ((16, 16, 16), 0.5)]:
        image = np.zeros(shape, np.float32)
        save(tmp_path / "x.nii.gz", image, np.float32, affine)
        _, _, record = preprocess_case(
            image[None], image[None].astype(np.uint8), affine, target=[8, 16, 32], spacing=[spacing] * 3,
            orientation="RAS",
        )  # fmt: skip
        estimate = resampled_shape(read_header(tmp_path / "x.nii.gz"), [spacing] * 3, "RAS")
        assert all(0 <= e - r <= 1 for e, r in zip(estimate, record["resampled_shape"], strict=True))
    # the default limit admits a 512 x 512 x 300 CT as stored and, with 1 mm voxels, padded to 512^3
    ct = Header((512, 512, 300), [1.0, 1.0, 1.0], [0, 1, 2])
    assert preprocessed_shape(ct, [1.0] * 3, "RAS", [128] * 3, "pad_resize") == [512, 512, 512]
    assert 512**3 <= DEFAULT_MAX_VOXELS and ct.voxels <= DEFAULT_MAX_VOXELS


def gzip_bomb(path: Path, size: int = 1100, payload: int = 1 << 20) -> None:
    """A .nii.gz whose header states size^3 uint8 voxels, followed by `payload` zero bytes only."""
    header = nib.Nifti1Header()
    header.set_data_shape((size, size, size))
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header.binaryblock + b"\0" * 4 + bytes(payload))


def test_a_gzip_bomb_is_refused_from_its_header(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 4, "nnunet")
    bomb = data / "imagesTr" / "case0_0000.nii.gz"
    gzip_bomb(bomb)
    assert bomb.stat().st_size < 10_000 and nib.load(bomb).shape == (1100, 1100, 1100), (
        "control: 1.3e9 voxels"
    )
    started = time.perf_counter()
    assert run_check(check(data, tmp_path)) == 1
    assert time.perf_counter() - started < 20
    assert problems(data, tmp_path) == [
        "imagesTr/case0_0000.nii.gz: header size 1100x1100x1100 = 1,331,000,000 voxels, over "
        f"dataset.max_voxels={DEFAULT_MAX_VOXELS:,}; raise dataset.max_voxels if the memory is there"
    ], "refused before its voxels were read: they are not even there, yet no 'cannot read'"
    with pytest.raises(DataError, match=r"case0_0000.nii.gz: header size 1100x1100x1100 = 1,331,000,000"):
        read_images([bomb], 1)  # medexp predict reads its inputs through this


def test_a_real_bomb_inflates_and_is_refused_at_a_lower_limit(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    save(path, np.zeros((200, 200, 200)), np.uint8, np.eye(4))
    reader = volume_reader(path)
    array, _ = reader.get_data(reader.read(str(path)))
    assert np.asarray(array).size == 8_000_000 and path.stat().st_size < 100_000, "control: it does inflate"
    with pytest.raises(
        DataError, match=r"header size 200x200x200 = 8,000,000 voxels, over dataset.max_voxels=1,000,000"
    ):
        read_images([path], 1, max_voxels=1_000_000)


def test_predict_refuses_an_image_that_resampling_would_blow_up():
    image, affine = np.zeros((1, 16, 16, 16), np.float32), np.diag([100.0, 100.0, 100.0, 1.0])
    ds = NiftiDataset(root="unused", shape=[16, 16, 16])
    with pytest.raises(DataError, match=r"^the image: resampled to 1.0 mm and padded 1501x1501x1501"):
        ds.preprocess_image(image, affine)
    kept = NiftiDataset(root="unused", shape=[16, 16, 16], spacing=None)
    assert kept.preprocess_image(image, affine)[0].shape == (1, 16, 16, 16), "control: on its own grid"
    with pytest.raises(ConfigError, match=r"dataset.max_voxels=0: expected a positive number of voxels"):
        NiftiDataset(root="unused", max_voxels=0).prepare()  # options are checked before the folder


def test_a_symlink_loop_is_one_problem_line(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 4)
    loop = data / "labels" / "case9.nii.gz"
    os.symlink(loop.name, loop)
    shutil.copy(data / "images" / "case0_t1.nii.gz", data / "images" / "case9_t1.nii.gz")
    with pytest.raises(OSError) as err:
        loop.stat()
    assert err.value.errno == errno.ELOOP, "control: reading the link raises (it gave a traceback)"
    assert run_check(check(data, tmp_path)) == 1
    assert capsys.readouterr().err == ""
    assert problems(data, tmp_path) == [
        "labels/case9.nii.gz: symbolic link loop (the link leads back to itself); remove or fix the link",
        "images/case9_t1.nii.gz: image without a label (expected labels/case9.nii.gz)",
    ]
    with pytest.raises(DataError, match=r"labels/case9.nii.gz: symbolic link loop"):
        NiftiDataset(root=str(data), shape=[16, 16, 16], cache_dir=str(tmp_path / "c")).prepare()


def test_a_long_dataset_name_is_refused(tmp_path):
    data = make_folder(tmp_path / "data", 3, "nnunet")
    with pytest.raises(DataError, match=r"^dataset.name: 300 characters, at most 100"):
        NiftiDataset(
            root=str(data), name="x" * 300, shape=[16, 16, 16], cache_dir=str(tmp_path / "c")
        ).prepare()
    NiftiDataset(root=str(data), name="x" * 100, shape=[16, 16, 16], cache_dir=str(tmp_path / "c")).prepare()
