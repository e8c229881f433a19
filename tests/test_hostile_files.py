"""Hostile files are refused with one line and nothing runs (docs/design.md §9): a checkpoint with a pickle
payload, a checkpoint whose stored config names `os.system` as a `_target_`, and output paths of
`medexp predict` that would leave `-o` (or overwrite an input, or another output).

Each payload, if it ran, would create a marker file; the controls show that it would (so the tests can
fail), the tests show that `resume`, `evaluate` and `predict` never get that far.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra.utils
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_medexp
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from typer.testing import CliRunner

from medexp.cli import app
from medexp.commands.predict import check_outputs, output_path, predict
from medexp.config.build import build_model, build_optimizer, build_scheduler
from medexp.config.compose import compose_config
from medexp.config.flat import from_yaml
from medexp.data.base import DatasetInfo
from medexp.data.demo import label_names
from medexp.errors import ConfigError, DataError
from medexp.run import checkpoint
from medexp.run.records import checkpoint_state
from medexp.run.restore import restore, restore_for_resume

SHAPE = [16, 16, 16]
# Stored kernel configs naming a target outside the allowlist: os.system (which Hydra itself also
# blocklists) and os.makedirs (which Hydra would run: only medexp's allowlist stops it).
TARGETS = {
    "os.system": lambda marker: {"_target_": "os.system", "_args_": [f"touch {marker}"]},
    "os.makedirs": lambda marker: {"_target_": "os.makedirs", "_args_": [str(marker)]},
}
KINDS = ["pickle", *TARGETS]


class Payload:
    """Unpickling this calls os.system(command): what a crafted checkpoint would do on torch.load."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A genuine checkpoint (untrained weights, exactly the payload training writes), the same with its
    config's kernel `_target_` set to os.system, and one that pickles a call to os.system."""
    root = tmp_path_factory.mktemp("hostile")
    cfg = compose_config([f"dataset.shape=[{','.join(map(str, SHAPE))}]", "dataset.num_cases=8"])
    info = DatasetInfo(
        name="demo3d", num_classes=6, label_names=label_names(6), in_channels=1, spatial_dims=3,
        shape=SHAPE, root=str(root / "data"),
    )  # fmt: skip
    model = build_model(cfg, 1, 6, 3)
    optimizer = build_optimizer(cfg, model.parameters())
    state = checkpoint_state(
        model, optimizer, build_scheduler(cfg, optimizer, 2), epoch=1, best=0.5, cfg=cfg, run_id=None,
        metrics={"val/dice_mean": 0.5}, info=info,
    )  # fmt: skip
    out = {"marker": root / "PAYLOAD_RAN", "scan": root / "scan.nii.gz"}
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), out["scan"])
    out["clean"] = checkpoint.save_atomic(state, root / "clean" / "checkpoints" / "best.pt")

    for kind, kernel in TARGETS.items():
        hostile = from_yaml(state["config"])
        hostile.kernel = kernel(out["marker"])
        out[kind] = checkpoint.save_atomic(
            {**state, "config": OmegaConf.to_yaml(hostile)}, root / kind / "checkpoints" / "best.pt"
        )
    out["pickle"] = root / "pickle" / "checkpoints" / "best.pt"
    out["pickle"].parent.mkdir(parents=True)
    torch.save({**state, "model": Payload(f"touch {out['marker']}")}, out["pickle"])
    return out


@pytest.mark.slow  # a child process that imports torch
def test_controls_the_payloads_are_live(files):
    """Loaded without the guards, each file runs its command (in a child process, marker in tmp_path)."""
    code = f"import torch; torch.load({str(files['pickle'])!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert files["marker"].exists(), "unpickling the crafted file runs os.system"
    files["marker"].unlink()
    stored = from_yaml(checkpoint.load(files["os.makedirs"])["config"])
    hydra.utils.instantiate(stored.kernel)
    assert files["marker"].is_dir(), "instantiating the stored kernel config runs os.makedirs"
    files["marker"].rmdir()


@pytest.mark.parametrize("kind", KINDS)
def test_restore_refuses_before_anything_is_built(files, kind: str):
    expected = (checkpoint.RefusedCheckpoint, "refused") if kind == "pickle" else (ConfigError, kind)
    for call in (lambda: restore(str(files[kind]), "best"), lambda: restore_for_resume(str(files[kind]))):
        with pytest.raises(expected[0], match=expected[1]) as err:
            call()
        assert str(files[kind]) in str(err.value) and "\n" not in str(err.value)
    assert not files["marker"].exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_with_one_line(files, kind: str, command: str, tmp_path: Path):
    args = [command, str(files[kind]), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if command == "predict":
        args += ["-i", str(files["scan"]), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"medexp {command}: error: {files[kind]}"), result.output
    assert "Traceback" not in result.output
    assert not files["marker"].exists()
    assert not (tmp_path / "out").exists(), "nothing written"


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["pickle", "os.system"])
def test_resume_refuses_with_one_line_and_starts_no_run(files, kind: str, tmp_path: Path):
    result = run_medexp(["train", f"resume={files[kind]}", "trainer.progress=false"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and errors[0].startswith(f"medexp train: error: {files[kind]}")
    assert not files["marker"].exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(ids) == [], "no MLflow run was started"


@pytest.mark.parametrize("name", ["../escape.nii.gz", "/tmp/escape.nii.gz", "sub/case.nii.gz", "..", ""])
def test_output_names_must_be_plain_file_names(tmp_path: Path, name: str):
    with pytest.raises(DataError, match="not a plain file name"):
        output_path(tmp_path, name)
    assert output_path(tmp_path, "case.nii.gz") == tmp_path / "case.nii.gz"


def test_outputs_that_escape_overwrite_or_collide_are_refused(tmp_path: Path):
    out, outside, scans = tmp_path / "masks", tmp_path / "outside.nii.gz", tmp_path / "scans"
    out.mkdir()
    outside.write_text("not yours")
    (out / "case.nii.gz").symlink_to(outside)
    with pytest.raises(DataError, match="leads outside -o"):
        check_outputs([("case.nii.gz", [scans / "case.nii.gz"])], out)
    with pytest.raises(DataError, match="would overwrite the input"):
        check_outputs([("a.nii.gz", [scans / "a.nii.gz"])], scans)
    same_case = [("a.nii.gz", [tmp_path / "x" / "a.nii.gz"]), ("a.nii.gz", [tmp_path / "y" / "a.nii.gz"])]
    with pytest.raises(DataError, match="both"):
        check_outputs(same_case, tmp_path / "z")
    check_outputs([("a.nii.gz", [scans / "a.nii.gz"]), ("b.nii.gz", [scans / "b.nii.gz"])], out)  # fine


def test_predict_refuses_a_symlink_out_of_the_output_folder_and_writes_nothing(files, tmp_path: Path):
    scans, out, outside = tmp_path / "scans", tmp_path / "masks", tmp_path / "precious.nii.gz"
    scans.mkdir()
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), scans / "case.nii.gz")
    nib.save(nib.Nifti1Image(image, np.eye(4)), scans / "other.nii.gz")
    outside.write_bytes(b"precious")
    out.mkdir()
    (out / "case.nii.gz").symlink_to(outside)
    with pytest.raises(DataError, match="leads outside -o"):
        predict(str(files["clean"]), [str(scans)], str(out), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert outside.read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["case.nii.gz"], "not even the other case was written"
