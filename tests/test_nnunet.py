"""nnU-Net v2 raw datasets as a first-class layout: per-channel files, channel_names, labels name -> value
with an `ignore` label, file_ending (NIfTI, NRRD, MetaImage), dataset ids under $nnUNet_raw, region labels
refused with the dataset.labels to give; end to end: data check, train, predict on imagesTs in the dataset's
label values with the input's shape and affine."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_medexp
from mlflow.tracking import MlflowClient

from medexp.commands.data_check import run_check
from medexp.data.labels import IGNORE_INDEX
from medexp.data.layout import discover
from medexp.data.nifti import NiftiDataset
from medexp.errors import DataError

# Oblique, anisotropic voxels with an offset: what a scanner writes (not RAS, not 1 mm).
AFFINE = np.array([[0, 0, 1.5, -10.0], [-1.25, 0, 0, 20.0], [0, 1.0, 0, 5.0], [0, 0, 0, 1]])  # float32-exact
LABELS = {"background": 0, "blob": 2, "corner": 4, "ignore": 5}  # values 2 and 4: classes 1 and 2


def phantom(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1-like, FLAIR-like, label): a blob (2) and a corner block (4) over noise, a few ignore (5) voxels."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    blob = sum(((g[i] - s / 2) / (s / 3)) ** 2 for i, s in enumerate(shape)) < 1
    label = np.where(blob, 2, 0).astype(np.uint8)
    label[(g[0] < shape[0] / 4) & (g[1] < shape[1] / 4)] = 4
    label[-2:, -2:, :] = 5  # a corner nobody annotated
    t1 = 40.0 + 30.0 * (label == 2) + 60.0 * (label == 4) + rng.normal(0, 5, shape)
    flair = 80.0 - 40.0 * (label == 2) + rng.normal(0, 5, shape)
    return t1, flair, label


def save(path: Path, array: np.ndarray, dtype=np.float32, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(array.astype(dtype), affine), path)
    else:  # NRRD through MONAI's ITK-free writer path: pynrrd with the RAS affine as LPS space directions
        import nrrd

        lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:, :3].T,
            "space origin": lps[:, 3],
        }
        nrrd.write(str(path), array.astype(dtype), header)


def make_nnunet(raw: Path, n_train: int = 6, n_test: int = 2, ending: str = ".nii.gz", labels=None) -> Path:
    """Dataset042_Phantom under `raw` (nnU-Net v2 raw): imagesTr/ (2 channels), labelsTr/, imagesTs/."""
    root = raw / "Dataset042_Phantom"
    for i in range(n_train + n_test):
        t1, flair, label = phantom((14 + i % 3, 18, 12), i)
        part = "Tr" if i < n_train else "Ts"
        save(root / f"images{part}" / f"case_{i:03d}_0000{ending}", t1)
        save(root / f"images{part}" / f"case_{i:03d}_0001{ending}", flair)
        if part == "Tr":
            save(root / "labelsTr" / f"case_{i:03d}{ending}", label, np.uint8)
    manifest = {
        "channel_names": {"0": "T1", "1": "FLAIR"},
        "labels": labels or LABELS,
        "numTraining": n_train,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def test_dataset_id_channels_labels_and_ignore(tmp_path, monkeypatch):
    make_nnunet(tmp_path / "raw")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    found = discover("42")  # as nnU-Net users type it; "Dataset042_Phantom" and "042" too
    assert (
        found.root == tmp_path / "raw" / "Dataset042_Phantom"
        and discover("Dataset042_Phantom").root == found.root
    )
    assert [c.id for c in found.cases] == [f"case_{i:03d}" for i in range(6)], "imagesTs is not training data"
    assert found.channel_files == ["0000", "0001"] and found.channel_names == ["T1", "FLAIR"]
    ds = NiftiDataset(root="42", shape=[16, 16, 16], cache_dir=str(tmp_path / "c"))
    cases = ds.prepare()
    info = ds.info
    assert (info.in_channels, info.label_names) == (2, ["background", "blob", "corner"])
    assert info.label_values == [0, 2, 4] and info.ignore_label == 5 and info.ignore_index == IGNORE_INDEX
    label = np.load(cases[0]["label"])
    assert set(np.unique(label)) == {0, 1, 2, IGNORE_INDEX}, "values 2, 4 -> classes 1, 2; ignore -> 255"


def test_dataset_id_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(DataError, match=r"dataset.root=42: not a folder; .* nnUNet_raw"):
        discover("42")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    with pytest.raises(DataError, match=r"dataset.root=7: no Dataset007_\* folder\(s\) in nnUNet_raw="):
        discover("7")


def test_region_labels_are_refused_unless_dataset_labels_are_given(tmp_path):
    regions = {"background": 0, "whole_tumour": [2, 4], "core": [4]}
    root = make_nnunet(tmp_path / "raw", n_train=4, n_test=0, labels=regions)
    ds = NiftiDataset(root=str(root), shape=[16, 16, 16], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as err:
        ds.prepare()
    message = str(err.value)
    assert "\n" not in message and "region label 'whole_tumour': [2, 4]" in message
    assert message.endswith("dataset.labels={0:background,2:label2,4:label4}"), message
    given = NiftiDataset(
        root=str(root), shape=[16, 16, 16], labels={0: "bg", 2: "edema", 4: "core", 5: "ignore"},
        cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    given.prepare()  # the file's region labels are not even parsed
    assert given.info.label_names == ["bg", "edema", "core"] and given.info.label_values == [0, 2, 4]


def test_nrrd_file_ending_reads_like_nifti(tmp_path):
    nifti = NiftiDataset(
        root=str(make_nnunet(tmp_path / "a", 4, 0)), shape=[16, 16, 16], cache_dir=str(tmp_path / "c")
    )
    nrrd = NiftiDataset(
        root=str(make_nnunet(tmp_path / "b", 4, 0, ending=".nrrd")),
        shape=[16, 16, 16],
        cache_dir=str(tmp_path / "c"),
    )
    for a, b in zip(nifti.prepare(), nrrd.prepare(), strict=True):
        np.testing.assert_allclose(np.load(a["image"]), np.load(b["image"]), atol=1e-5)
        np.testing.assert_array_equal(np.load(a["label"]), np.load(b["label"]))


def test_mha_needs_itk_or_reads_like_nifti(tmp_path):
    """MetaImage is read by MONAI's ITKReader; without the `itk` extra the case says what to install."""
    root = make_nnunet(tmp_path / "a", 4, 0)
    target = tmp_path / "m" / "Dataset042_Phantom"
    try:
        import itk
    except ImportError:
        itk = None
    for path in root.rglob("*.nii.gz"):
        out = target / path.relative_to(root).parent / path.name.replace(".nii.gz", ".mha")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"") if itk is None else itk.imwrite(itk.imread(str(path)), str(out))
    manifest = json.loads((root / "dataset.json").read_text())
    (target / "dataset.json").write_text(json.dumps({**manifest, "file_ending": ".mha"}))
    mha = NiftiDataset(root=str(target), shape=[16, 16, 16], cache_dir=str(tmp_path / "c"))
    if itk is None:
        with pytest.raises(DataError, match=r"reading .mha files needs ITK: pip install 'medexp\[itk\]'"):
            mha.prepare()
        return
    nifti = NiftiDataset(root=str(root), shape=[16, 16, 16], cache_dir=str(tmp_path / "c"))
    for a, b in zip(nifti.prepare(), mha.prepare(), strict=True):
        np.testing.assert_allclose(np.load(a["image"]), np.load(b["image"]), atol=1e-4)
        np.testing.assert_array_equal(np.load(a["label"]), np.load(b["label"]))


@pytest.fixture(scope="module")
def nnunet_run(tmp_path_factory):
    """A 2-epoch run on a two-channel nnU-Net v2 dataset given by its id, with system metrics sampled."""
    base = tmp_path_factory.mktemp("nnunet")
    make_nnunet(base / "raw")
    args = [
        "train", "dataset=nifti", "dataset.root=Dataset042_Phantom", "dataset.shape=[16,16,16]",
        "trainer.max_epochs=2", "trainer.progress=false", "tracking.log_plots=false", "eval.metrics=[dice]",
        "tracking.system_metrics=true", "experiment_name=nnunet",
    ]  # fmt: skip
    env = {"nnUNet_raw": str(base / "raw"), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    result = run_medexp(args, cwd=base, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr
    client = MlflowClient(f"sqlite:///{base / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("nnunet").experiment_id])
    return base, run, env


@pytest.mark.e2e
def test_data_check_train_and_predict_imagesTs(nnunet_run, monkeypatch, capsys):
    base, run, env = nnunet_run
    monkeypatch.setenv("nnUNet_raw", env["nnUNet_raw"])
    assert run_check(["dataset=nifti", "dataset.root=42", f"dataset.cache_dir={base}/check"]) == 0
    assert "all 6 case(s) usable" in capsys.readouterr().out
    assert run.info.status == "FINISHED" and 0.0 <= run.data.metrics["test/dice_mean"] <= 1.0
    assert any(k.startswith("system/") for k in run.data.metrics), "tracking.system_metrics=true"
    images = base / "raw" / "Dataset042_Phantom" / "imagesTs"
    out = base / "pred"
    model = f"runs:/{run.info.run_id}/model"  # the MLflow model: label values from the store alone
    store = f"sqlite:///{base / 'outputs' / 'mlflow.db'}"
    args = ["predict", model, "-i", str(images), "-o", str(out), "--probabilities", "--tracking-uri", store]
    result = run_medexp(args, cwd=base, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("case_*[0-9].nii.gz")) == ["case_006.nii.gz", "case_007.nii.gz"]
    for case in ("case_006", "case_007"):
        given = nib.load(images / f"{case}_0000.nii.gz")
        labels = nib.load(out / f"{case}.nii.gz")
        assert labels.shape == given.shape and np.allclose(labels.affine, AFFINE)
        probs = nib.load(out / f"{case}_probabilities.nii.gz").get_fdata()  # (X, Y, Z, 3 classes)
        np.testing.assert_array_equal(np.asarray(labels.dataobj), np.array([0, 2, 4])[probs.argmax(-1)])


def test_predict_groups_channel_files_as_training_did(tmp_path):
    from medexp.commands.predict import group_cases
    from medexp.data.base import DatasetInfo

    def info(channels: int, files: list[str]) -> DatasetInfo:
        return DatasetInfo("x", 2, ["background", "a"], channels, 3, [16, 16, 16], "", channel_files=files)

    names = ["sub02_flair.nii.gz", "sub02_t1.nii.gz", "sub03_t1.nii.gz", "sub03_flair.nii.gz", "other.nii"]
    files = [tmp_path / n for n in names]
    assert group_cases(files, info(2, ["t1", "flair"])) == [
        ("other.nii", [tmp_path / "other.nii"]),  # e.g. a 4D file with both channels
        ("sub02.nii.gz", [tmp_path / "sub02_t1.nii.gz", tmp_path / "sub02_flair.nii.gz"]),
        ("sub03.nii.gz", [tmp_path / "sub03_t1.nii.gz", tmp_path / "sub03_flair.nii.gz"]),
    ]
    single = group_cases([tmp_path / "case_001_0000.nrrd"], info(1, ["0000"]))
    assert single == [("case_001.nrrd", [tmp_path / "case_001_0000.nrrd"])], "nnU-Net names outputs by case"
    with pytest.raises(DataError, match=r"sub04_flair.nii.gz: channel file of case sub04 not found"):
        group_cases([tmp_path / "sub04_t1.nii.gz"], info(2, ["t1", "flair"]))


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd"])
def test_label_maps_are_written_in_the_inputs_format_and_grid(tmp_path, ending):
    from medexp.commands.predict import write_labels
    from medexp.data.reading import read_images, volume_reader

    t1, _, label = phantom((9, 7, 5), 0)
    save(tmp_path / f"in{ending}", t1)
    image, affine = read_images([tmp_path / f"in{ending}"], 1)
    assert image.shape == (1, 9, 7, 5) and np.allclose(affine, AFFINE)
    write_labels(tmp_path / f"out{ending}", label, tmp_path / f"in{ending}", affine)
    reader = volume_reader(tmp_path / f"out{ending}")
    array, meta = reader.get_data(reader.read(str(tmp_path / f"out{ending}")))
    np.testing.assert_array_equal(np.asarray(array), label)
    assert np.allclose(meta["affine"], AFFINE)
    if ending == ".nrrd":
        import nrrd

        assert nrrd.read_header(str(tmp_path / "out.nrrd"))["type"] == "uint8"
    else:
        assert nib.load(tmp_path / "out.nii.gz").get_data_dtype() == np.uint8
