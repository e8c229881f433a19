"""Every named experiment (conf/experiment/*.yaml) composes and trains one tiny epoch through the real CLI,
the lightning-hydra-template habit: an experiment file that stops composing or training fails here.

Experiments that need the same tiny overrides share one `medexp train -m experiment=a,b,...` (one process
start for several jobs). The NeRD and FFT experiments read real-looking data folders made here (WMH:
T1 + FLAIR volumes with the challenge's labels 0/1/2; LA: volumes with labels 0/255; BBBC005: PNG images
with 0/255 masks), so their crops, resizes and normalisations run as in the papers.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_medexp, store_uri
from mlflow.tracking import MlflowClient
from PIL import Image

from medexp.config.compose import compose_config
from medexp.config.registry import group_choices

pytestmark = pytest.mark.e2e

FOLDERS = {"nerd_wmh": "wmh", "nerd_wmh_512": "wmh", "nerd_la": "la", "nerd_la_512": "la", "fft_unet": "bbbc"}


def tiny_overrides(experiment: str) -> list[str]:
    """Shrink an experiment to one epoch on a few small volumes, keeping its method (kernel, loss, head,
    model, input stage, optimiser, schedule, augmentation, preprocessing) as the file sets it. 3D runs
    score Dice only; 2D runs keep the experiment's own metrics (lesion-wise, counting), which are cheap."""
    cfg = compose_config([f"experiment={experiment}"])
    dims = cfg.dataset.get("spatial_dims", 3)
    shape = "[32,32]" if dims == 2 else "[16,16,16]"
    out = [f"dataset.shape={shape}", "trainer.max_epochs=1", "trainer.devices=1", "trainer.batch_size=2"]
    out += ["trainer.progress=false", "tracking.log_plots=false", "tracking.log_checkpoint=false"]
    out += ["eval.metrics=[dice]"] if dims == 3 else []
    if "num_cases" in cfg.dataset:
        out.append("dataset.num_cases=8")
    out.append("++model.channels=[4,4,8,8,8]")  # five levels as in the papers (per-level dropout lists)
    return out


def group_of(experiment: str) -> tuple[str, ...]:
    """Experiments run together share their tiny overrides and data folder."""
    return (FOLDERS.get(experiment, "demo"), *tiny_overrides(experiment))


def make_folders(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    for name in ("wmh", "la", "bbbc"):
        for sub in ("images", "labels"):
            (root / name / sub).mkdir(parents=True)
    for i in range(6):
        # WMH: 40 x 36 in-plane, 4 axial slices of 3 mm; lesions 1, "other pathology" 2 (-> background)
        label = np.zeros((40, 36, 4), np.uint8)
        label[10 + i : 16 + i, 12:18, 1:3] = 1
        label[25:28, 5:8, 2] = 2
        affine = np.diag([1.0, 1.0, 3.0, 1.0])
        for modality, scale in (("t1", 0.5), ("flair", 2.0)):
            image = (scale * (label == 1) + rng.normal(100, 5, label.shape)).astype(np.float32)
            nib.save(nib.Nifti1Image(image, affine), root / "wmh" / "images" / f"s{i}_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "wmh" / "labels" / f"s{i}.nii.gz")
        # LA: 30 x 36 in-plane (padded and cropped to 32 x 32), labels 0/255, 0.625 mm voxels
        atrium = np.zeros((30, 36, 4), np.uint8)
        atrium[8:20, 10 + i : 24 + i, :] = 255
        image = (atrium / 255.0 + rng.normal(0, 0.2, atrium.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.diag([0.625] * 3 + [1])), root / "la" / "images" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(atrium, np.diag([0.625] * 3 + [1])), root / "la" / "labels" / f"c{i}.nii.gz")
        # BBBC005: 48 x 40 grey cell images, masks 0/255, resized to 32 x 32
        mask = np.zeros((48, 40), np.uint8)
        mask[5 + i : 15 + i, 5:15] = mask[30:40, 20 + i : 32 + i] = 255
        cells = np.clip(mask * 0.6 + rng.normal(40, 10, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(cells).save(root / "bbbc" / "images" / f"img{i}.png")
        Image.fromarray(mask).save(root / "bbbc" / "labels" / f"img{i}.png")
    return {name: root / name for name in ("wmh", "la", "bbbc")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{experiment: its finished MLflow run}, one multirun per group, run on first use of the group."""
    cwd = tmp_path_factory.mktemp("experiments")
    folders = make_folders(cwd / "data")
    client = MlflowClient(store_uri(cwd))
    runs: dict[str, object] = {}

    def get(experiment: str):
        if experiment not in runs:
            key = group_of(experiment)
            group = [e for e in group_choices("experiment") if group_of(e) == key]
            root = [f"dataset.root={folders[key[0]]}"] if key[0] in folders else []
            name = f"exp-{key[0]}-{len(runs)}"
            args = [
                "train",
                "-m",
                f"experiment={','.join(group)}",
                *key[1:],
                *root,
                f"experiment_name={name}",
            ]
            result = run_medexp(args, cwd=cwd)
            assert result.returncode == 0, result.stderr[-3000:]
            for run in client.search_runs([client.get_experiment_by_name(name).experiment_id]):
                if "kernel" in run.data.tags:  # not the sweep's parent run
                    overrides = run.data.tags["overrides"].split()
                    (chosen,) = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
                    runs[chosen] = run
        return runs[experiment]

    return get


@pytest.mark.parametrize("experiment", group_choices("experiment"))
def test_experiment_trains_one_tiny_epoch(trained, experiment: str):
    run = trained(experiment)
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["test/dice_mean"] <= 1.0
    cfg = compose_config([f"experiment={experiment}"])
    if cfg.dataset.get("spatial_dims", 3) == 2:  # the experiment's own metrics, scored per volume
        for metric in cfg.eval.metrics:
            assert f"test/{metric}_mean" in run.data.metrics, metric


def test_paper_setups_compose_as_the_papers_state():
    nerd = compose_config(["experiment=nerd_wmh"])
    assert (nerd.dataset.fit, list(nerd.dataset.shape), nerd.dataset.normalize) == (
        "crop",
        [160, 224],
        "minmax",
    )
    assert list(nerd.dataset.modalities) == ["t1", "flair"] and nerd.dataset.spatial_dims == 2
    assert nerd.augment._target_.endswith("no_augmentation") and nerd.trainer.batch_size == 14
    assert (nerd.optim.weight_decay, nerd.lr, nerd.trainer.max_epochs) == (1e-6, 1e-3, 90)
    assert list(nerd.eval.metrics) == ["dice", "ldice", "ltpr", "lfpr", "lppv"]
    assert list(nerd.split_ratios) == [0.7, 0.1, 0.2], "Sec. 3.1: 42/6/12 of 60 WMH volumes"
    la = compose_config(["experiment=nerd_la_512"])
    assert list(la.dataset.shape) == [290, 240] and list(la.model.channels) == [32, 64, 128, 256, 512]
    assert list(la.eval.metrics) == ["dice", "jaccard", "asd", "hd", "hd95"]
    fft = compose_config(["experiment=fft_unet"])
    assert (fft.model.activation, fft.model.norm, list(fft.model.dropout)) == (
        "elu",
        "none",
        [0.1, 0.1, 0.2, 0.2, 0.2],
    )
    assert (fft.dataset.fit, list(fft.dataset.shape), fft.trainer.max_epochs) == ("resize", [256, 256], 100)
    assert "count_error" in fft.eval.metrics and fft.loss._target_.endswith("DiceLoss")
    wong = compose_config(["experiment=wong2022"])
    assert (
        wong.augment.prob == 0.8
        and wong.optim._target_ == "torch.optim.NAdam"
        and wong.trainer.max_epochs == 300
    )
