"""dataset=nifti: layouts, preprocessing (Wong & Moradi 3.1), the on-disk cache, bad input, 3D and 2D runs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.data.loaders import expand_slices, make_loader
from medexp.data.nifti import NiftiDataset
from medexp.data.splits import load_or_make_splits, select
from medexp.errors import DataError

# A realistic header: axes permuted and flipped (not RAS), anisotropic 0.9 x 1.1 x 3 mm voxels, an offset.
AFFINE = np.array([[0, -1.1, 0, 30.0], [0.9, 0, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
LABELS = {0: "background", 1: "blob", 2: "corner"}


def phantom(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, label): an ellipsoid (1) and a corner block (2) over noise; the image is int16-like."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    c = [s / 2 for s in shape]
    label = (((g[0] - c[0]) / (shape[0] / 3)) ** 2 + ((g[1] - c[1]) / (shape[1] / 3)) ** 2 < 1).astype(
        np.uint8
    )
    if len(shape) == 3:
        label &= (np.abs(g[2] - c[2]) < shape[2] / 3).astype(np.uint8)
    label[(g[0] < shape[0] / 4) & (g[1] < shape[1] / 4)] = 2
    image = 40.0 + 60.0 * label + rng.normal(0, 8, shape)
    return image, label


def save(path: Path, array: np.ndarray, dtype, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), affine), path)


def make_folder(root: Path, n: int = 6, layout: str = "folders") -> Path:
    """n cases of odd shapes, mixed dtypes, .nii and .nii.gz, in one of three layouts.

    folders: images/ + labels/ with T1 and FLAIR as <case>_t1 / <case>_flair;
    msd: imagesTr/ + labelsTr/ + dataset.json, one 4D image (2 modalities) per case;
    nnunet: imagesTr/<case>_0000.nii.gz + labelsTr/, dataset.json (nnU-Net v2: {name: value} labels).
    """
    dtypes = [np.int16, np.float32, np.uint8]
    training = []
    for i in range(n):
        shape = (19 + i, 17, 9 if i % 2 else 8)
        image, label = phantom(shape, i)
        ext = ".nii.gz" if i % 2 == 0 else ".nii"
        name, dtype = f"case{i}", dtypes[i % 3]
        if layout == "folders":
            save(root / "images" / f"{name}_t1{ext}", image, dtype)
            save(root / "images" / f"{name}_flair{ext}", image[::-1].copy() * 0.5, dtype)
            save(root / "labels" / f"{name}{ext}", label, np.uint8)
        elif layout == "msd":
            save(root / "imagesTr" / f"{name}{ext}", np.stack([image, image * 0.5], axis=-1), dtype)
            save(root / "labelsTr" / f"{name}{ext}", label, np.uint8)
            training.append({"image": f"./imagesTr/{name}{ext}", "label": f"./labelsTr/{name}{ext}"})
        else:
            save(root / "imagesTr" / f"{name}_0000{ext}", image, dtype)
            save(root / "labelsTr" / f"{name}{ext}", label, np.uint8)
    if layout == "msd":
        labels = {"0": "background", "1": "blob", "2": "corner"}
        manifest = {
            "name": "Phantom",
            "labels": labels,
            "modality": {"0": "T1", "1": "T2"},
            "training": training,
        }
        (root / "dataset.json").write_text(json.dumps(manifest))
    if layout == "nnunet":
        manifest = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "blob": 1, "corner": 2}}
        (root / "dataset.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize(
    ("layout", "channels", "names"),
    [
        ("folders", 2, ["background", "label1", "label2"]),
        ("msd", 2, ["background", "blob", "corner"]),
        ("nnunet", 1, ["background", "blob", "corner"]),
    ],
)
def test_layouts_preprocess_to_shape(tmp_path, layout, channels, names):
    ds = NiftiDataset(
        root=str(make_folder(tmp_path / "data", 5, layout)),
        shape=[16, 16, 16],
        cache_dir=str(tmp_path / "cache"),
    )
    cases = ds.prepare()
    assert [c["id"] for c in cases] == [f"case{i}" for i in range(5)]
    assert (ds.info.in_channels, ds.info.label_names) == (channels, names)
    image, label = np.load(cases[0]["image"]), np.load(cases[0]["label"])
    assert image.shape == (channels, 16, 16, 16) and image.dtype == np.float32  # (C, D, H, W)
    assert label.shape == (1, 16, 16, 16) and set(np.unique(label)) == {0, 1, 2}
    assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-2, "z-score"
    assert Path(ds.info.root).parent == tmp_path / "cache", "cache and splits live outside the data folder"


def test_geometry_is_kept_in_world_coordinates(tmp_path):
    """Resample to 1 mm, pad, resize: the label's centre stays where it was in scanner (mm) coordinates."""
    make_folder(tmp_path / "data", 3, "nnunet")
    ds = NiftiDataset(root=str(tmp_path / "data"), shape=[16, 16, 16], cache_dir=str(tmp_path / "c"))
    case = ds.prepare()[1]
    (record_file,) = (Path(ds.info.root) / "cases").glob("case1-*.json")  # <id>-<hash of its files>
    record = json.loads(record_file.read_text())
    original = nib.load(tmp_path / "data" / "labelsTr" / "case1.nii")
    before = original.affine @ np.r_[np.argwhere(original.get_fdata() == 1).mean(0), 1]
    after_label = np.load(case["label"])[0]
    after = np.array(record["prep"]["record"]["affine"]) @ np.r_[np.argwhere(after_label == 1).mean(0), 1]
    spacing = record["prep"]["record"]["spacing"]
    assert np.allclose(spacing, spacing[0]), "isotropic after resizing"
    assert np.linalg.norm(before[:3] - after[:3]) < spacing[0], (before, after)
    assert record["original"]["shape"] == [20, 17, 9] and np.allclose(record["original"]["affine"], AFFINE)


def test_second_prepare_reads_the_cache_and_redoes_only_changed_cases(tmp_path):
    data = make_folder(tmp_path / "data", 5)
    kwargs = dict(root=str(data), shape=[16, 16, 16], labels=LABELS, cache_dir=str(tmp_path / "c"))
    first = NiftiDataset(**kwargs)
    cases = first.prepare()
    stamps = [Path(c["image"]).stat().st_mtime_ns for c in cases]
    second = NiftiDataset(**kwargs)
    assert second.prepare() == cases
    assert first.stats["preprocessed"] == 5 and second.stats == {"preprocessed": 0, "reused": 5, "read": 0}
    assert [Path(c["image"]).stat().st_mtime_ns for c in cases] == stamps
    os.utime(data / "labels" / "case2.nii.gz", ns=(1, 1))  # a changed file: that case alone is redone
    third = NiftiDataset(**kwargs)
    third.prepare()
    assert third.stats == {"preprocessed": 1, "reused": 4, "read": 1}


def test_read_only_data_folder_and_label_merging(tmp_path):
    data = make_folder(tmp_path / "data", 4)
    for path in [data, *data.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        ds = NiftiDataset(
            root=str(data),
            shape=[16, 16, 16],
            labels={0: "bg", 1: "fg", 2: "fg"},
            modalities=["t1"],
            cache_dir=str(tmp_path / "c"),
        )
        cases = ds.prepare()
    finally:
        for path in [data, *data.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert ds.info.label_names == ["bg", "fg"] and ds.info.in_channels == 1
    assert set(np.unique(np.load(cases[0]["label"]))) == {0, 1}


def test_unlisted_labels_error_or_background(tmp_path):
    data = make_folder(tmp_path / "data", 4)
    with pytest.raises(
        DataError, match=r"labels/case0.nii.gz: label values 2 not in dataset.labels \(0, 1\)"
    ):
        NiftiDataset(
            root=str(data), shape=[16, 16, 16], labels=["background", "blob"], cache_dir=str(tmp_path / "c")
        ).prepare()
    ds = NiftiDataset(
        root=str(data),
        shape=[16, 16, 16],
        labels=["background", "blob"],
        unlisted_labels="background",
        cache_dir=str(tmp_path / "c"),
    )
    assert set(np.unique(np.load(ds.prepare()[0]["label"]))) == {0, 1}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_INPUTS = {
    "missing root": (lambda d: d.rename(d.parent / "gone"), "data: folder not found"),
    "no pairs": (lambda d: [p.unlink() for p in d.rglob("*.nii*")], "no image/label pairs found"),
    "image without label": (
        lambda d: (d / "labels" / "case1.nii").unlink(),
        "images/case1_flair.nii: image without a label (expected labels/case1.nii)",
    ),
    "shape mismatch": (
        lambda d: save(d / "labels" / "case3.nii", np.zeros((22, 17, 8)), np.uint8),
        "labels/case3.nii: shape 22x17x8 differs from image images/case3_flair.nii 22x17x9",
    ),
    "label values": (
        lambda d: save(d / "labels" / "case2.nii.gz", np.full((21, 17, 8), 7), np.uint8),
        "labels/case2.nii.gz: label values 7 not in dataset.labels (0, 1, 2)",
    ),
    "truncated": (
        lambda d: _truncate(d / "images" / "case0_t1.nii.gz"),
        "images/case0_t1.nii.gz: cannot read (truncated or corrupt file",
    ),
    "4D image": (
        lambda d: save(d / "images" / "case1_t1.nii", np.zeros((20, 17, 9, 2)), np.int16),
        "images/case1_t1.nii: 4D image (20x17x9x2) where 3D is expected",
    ),
    "NaN": (
        lambda d: save(d / "images" / "case2_t1.nii.gz", np.full((21, 17, 8), np.nan), np.float32),
        "images/case2_t1.nii.gz: 2856 NaN voxel(s)",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file(tmp_path, problem):
    data = make_folder(tmp_path / "data", 6)
    spoil, expected = BAD_INPUTS[problem]
    spoil(data)
    with pytest.raises(DataError) as err:
        NiftiDataset(
            root=str(data), shape=[16, 16, 16], labels=LABELS, cache_dir=str(tmp_path / "c")
        ).prepare()
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_2d_slices_are_split_by_volume(tmp_path):
    ds = NiftiDataset(
        root=str(make_folder(tmp_path / "data", 6)),
        spatial_dims=2,
        shape=[16, 16],
        cache_dir=str(tmp_path / "c"),
    )
    cases = ds.prepare()
    assert len(cases) == 6 and all(len(c["slices"]) in (8, 9) for c in cases), (
        "3 mm slices kept, not resampled"
    )
    parts = select(cases, load_or_make_splits(ds.info.root, [c["id"] for c in cases]), 0)
    volumes = {p: {s["id"].split("_s")[0] for s in expand_slices(parts[p])} for p in parts}
    assert not (volumes["train"] & volumes["test"]) and not (volumes["val"] & volumes["test"])
    batch = next(iter(make_loader(parts["train"], batch_size=4, train=True)))
    assert batch["image"].shape == (4, 2, 16, 16) and batch["label"].shape == (4, 1, 16, 16)


def test_2d_image_files(tmp_path):
    from PIL import Image

    for i in range(4):
        image, label = phantom((24 + i, 20), i)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB").save(
            tmp_path / "images" / f"p{i}.png"
        )
        Image.fromarray(label * 100).save(tmp_path / "labels" / f"p{i}.tif")
    ds = NiftiDataset(
        root=str(tmp_path),
        spatial_dims=2,
        shape=[16, 16],
        labels={0: "bg", 100: "a", 200: "b"},
        cache_dir=str(tmp_path / "c"),
    )
    cases = ds.prepare()
    assert ds.info.in_channels == 3 and np.load(cases[0]["image"]).shape == (3, 16, 16)
    assert set(np.unique(np.load(cases[0]["label"]))) == {0, 1, 2}


def _runs(cwd: Path):
    db = cwd / "outputs" / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(store_uri(cwd))
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.e2e
def test_msd_4d_check_train_3d_and_2d_and_predict_imagesTs(tmp_path, capsys):
    """An MSD task (one 4D file of 2 modalities per case): data check ok, 2-epoch 3D and 1-epoch 2D runs,
    `medexp predict` on imagesTs with each: one label map per case with the input's shape and affine."""
    data = make_folder(tmp_path / "data", 5, "msd")
    for i in (5, 6):  # imagesTs: 4D files like imagesTr's, no labels
        image, _ = phantom((18 + i, 17, 9), i)
        save(data / "imagesTs" / f"case{i}.nii.gz", np.stack([image, image * 0.5], axis=-1), np.int16)
    from medexp.commands.data_check import run_check

    assert run_check(["dataset=msd", f"dataset.root={data}", f"dataset.cache_dir={tmp_path}/check"]) == 0
    assert "all 5 case(s) usable" in capsys.readouterr().out
    common = [
        f"dataset.root={data}",
        "trainer.progress=false",
        "eval.metrics=[dice]",
        "tracking.log_plots=false",
    ]
    result = run_medexp(
        ["train", "dataset=msd", "dataset.shape=[16,16,16]", "trainer.max_epochs=2", *common], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr
    (run3d,) = _runs(tmp_path)
    result = run_medexp(
        [
            "train",
            "dataset=msd",
            "dataset.spatial_dims=2",
            "dataset.shape=[16,16]",
            "trainer.max_epochs=1",
            *common,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs(tmp_path)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all({"test/dice/blob", "test/dice/corner"} <= set(r.data.metrics) for r in runs), (
        "dataset.json names"
    )
    out = tmp_path / "pred"
    result = run_medexp(
        ["predict", run3d.info.run_id, "-i", str(data / "imagesTs"), "-o", str(out)], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["case5.nii.gz", "case6.nii.gz"]
    for i in (5, 6):
        labels = nib.load(out / f"case{i}.nii.gz")
        assert labels.shape == (18 + i, 17, 9) and np.allclose(labels.affine, AFFINE)
        assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2}
    (run2d,) = [r for r in runs if r.info.run_id != run3d.info.run_id]
    out2d = tmp_path / "pred2d"  # the slice model from its MLflow model: slices predicted and stacked
    result = run_medexp(
        ["predict", f"runs:/{run2d.info.run_id}/model", "-i", str(data / "imagesTs"), "-o", str(out2d)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for i in (5, 6):
        labels = nib.load(out2d / f"case{i}.nii.gz")
        assert labels.shape == (18 + i, 17, 9) and np.allclose(labels.affine, AFFINE)


@pytest.mark.e2e
def test_bad_folder_through_the_cli_fails_before_any_run(tmp_path):
    data = make_folder(tmp_path / "data", 5)
    _truncate(data / "labels" / "case4.nii.gz")
    result = run_medexp(
        [
            "train",
            "dataset=nifti",
            f"dataset.root={data}",
            "dataset.shape=[16,16,16]",
            "trainer.progress=false",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert lines[-1].startswith("medexp train: error: ") and "labels/case4.nii.gz: cannot read" in lines[-1]
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(r.info.status == "RUNNING" for r in _runs(tmp_path))


def test_a_slice_model_segments_a_volume_slice_by_slice(tmp_path):
    """medexp predict with a 2D model (dataset.spatial_dims=2) on a volume: each slice across slice_axis
    gets the network's logits for exactly that cached training slice, and the label map comes back on the
    input's own grid (shape and affine of the file)."""
    import torch

    from medexp.config.build import build_dataset, build_model
    from medexp.config.compose import compose_config
    from medexp.tracking.models import Segmenter

    data = make_folder(tmp_path / "data", 4)
    cfg = compose_config(
        [
            "dataset=nifti",
            f"dataset.root={data}",
            "dataset.spatial_dims=2",
            "dataset.shape=[16,16]",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "model=unet",
            "model.channels=[4,8]",
        ]
    )
    ds = build_dataset(cfg)
    cases = ds.prepare()
    torch.manual_seed(0)
    net = build_model(cfg, ds.info.in_channels, ds.info.num_classes, 2)
    segmenter = Segmenter(cfg, ds.info, net.state_dict(), device=torch.device("cpu"))
    volume = torch.from_numpy(np.load(cases[0]["image"]))  # (C, X, Y, Z) as preprocessed for training
    with torch.no_grad():
        stacked = segmenter._slice_logits(volume)[0]  # (K, X, Y, Z)
        for part in cases[0]["slices"]:
            alone = segmenter.model(torch.from_numpy(np.load(part["image"]))[None])[0]  # (K, X, Y)
            torch.testing.assert_close(stacked[..., part["slice"]], alone, rtol=1e-5, atol=1e-5)
    from medexp.data.reading import read_images

    image_file = data / "images" / "case1_t1.nii"
    channels = [data / "images" / "case1_flair.nii", image_file]  # modalities: all found, sorted
    image, affine = read_images(channels, ds.info.in_channels)
    labels = segmenter.segment(image, affine)
    assert labels.shape == nib.load(image_file).shape and set(np.unique(labels)) <= {0, 1, 2}
