"""The MLflow model in the store holds data only (docs/design.md §9, "Model hand-off"; docs/faults.md
"Hostile files"): its code is the installed medexp (loader_module), so rewriting or adding any file of the
model folder other than its data cannot change what `medexp predict` runs, a payload in its config or
weights is refused in one line, its requirements install from an index, and pyfunc callers must give the
volume's affine.

Each attack has a control: the same tampered folder loaded by MLflow's generic loader (which trusts the
MLmodel file) runs the payload, and the same config built without medexp's guard runs it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import Payload, tracking
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement
from test_hostile_files import PAYLOADS, hostile_yaml
from typer.testing import CliRunner

from medexp.cli import app
from medexp.commands.predict import predict
from medexp.config.build import build_model
from medexp.config.compose import compose_config
from medexp.config.flat import from_yaml
from medexp.data.base import DatasetInfo
from medexp.data.demo import label_names
from medexp.errors import ConfigError, DataError
from medexp.tracking.models import DATA_DIR, load_segmenter, log_model

pytestmark = pytest.mark.slow  # logs an MLflow model into a sqlite store and predicts with it several times
SHAPE = [16, 16, 16]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> SimpleNamespace:
    """An untrained network logged as a medexp MLflow model (registered as `hostile`, version 1) in a
    sqlite store of its own, its folder in the store, and a scan with an affine of its own."""
    root = tmp_path_factory.mktemp("model-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_config([f"dataset.shape=[{','.join(map(str, SHAPE))}]", "dataset.num_cases=8"])
    info = DatasetInfo(
        name="demo3d", num_classes=6, label_names=label_names(6), in_channels=1, spatial_dims=3,
        shape=SHAPE, root=str(root / "data"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, 1, 6, 3)
    client = MlflowClient(uri)
    experiment = client.create_experiment("models", artifact_location=(root / "mlartifacts").as_uri())
    with tracking(uri), mlflow.start_run(experiment_id=experiment) as run:
        model_uri = log_model(model, cfg, info, register_as="hostile")
        logged = mlflow.get_logged_model(model_uri.split("/")[-1])
    folder = Path(logged.artifact_location.removeprefix("file://"))
    scan = root / "scans" / "case.nii.gz"
    scan.parent.mkdir()
    affine = np.array([[0, 0, -1.5, 30], [2.0, 0, 0, -40], [0, 1.0, 0, 12], [0, 0, 0, 1]])
    image = np.random.default_rng(3).normal(size=(20, 16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), scan)
    return SimpleNamespace(
        root=root, uri=uri, run_id=run.info.run_id, folder=folder, scan=scan, image=image, affine=affine,
        model=model, marker=root / "PAYLOAD_RAN", runs_uri=f"runs:/{run.info.run_id}/model",
    )  # fmt: skip


@pytest.fixture
def tampering(store):
    """The model folder as logged is restored after the test; the marker must never remain."""
    backup = store.root / "backup"
    shutil.copytree(store.folder, backup)
    try:
        yield store.folder
    finally:
        shutil.rmtree(store.folder)
        shutil.move(backup, store.folder)
        if store.marker.is_dir():
            store.marker.rmdir()
        store.marker.unlink(missing_ok=True)


def labels(store, out: Path, model_uri: str | None = None) -> np.ndarray:
    written = predict(model_uri or store.runs_uri, [str(store.scan)], str(out), tracking_uri=store.uri)
    return np.asarray(nib.load(written[0]).dataobj)


def test_the_store_holds_data_only(store):
    files = sorted(str(p.relative_to(store.folder)) for p in store.folder.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".py", ".pkl", ".pyc"))], files
    assert {f"{DATA_DIR}/weights.pt", f"{DATA_DIR}/config.yaml", f"{DATA_DIR}/info.json"} <= set(files)
    flavor = yaml.safe_load((store.folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "medexp.tracking.pyfunc_loader" and flavor["data"] == DATA_DIR
    assert "python_model" not in flavor and not flavor.get("code")
    weights = torch.load(store.folder / DATA_DIR / "weights.pt", weights_only=True)
    expected = store.model.state_dict()
    assert set(weights) == set(expected) and all(torch.equal(weights[k], expected[k]) for k in weights)


def test_requirements_install_from_an_index(store):
    lines = [line for line in (store.folder / "requirements.txt").read_text().splitlines() if line.strip()]
    reqs = {Requirement(line).name: Requirement(line) for line in lines}
    assert not [line for line in lines if "+" in line.split("@")[0]], "no local build labels"
    public_torch = torch.__version__.split("+")[0]  # 2.13.0+cpu -> 2.13.0
    assert str(reqs["torch"].specifier) == f"=={public_torch}"
    medexp = reqs["medexp"]
    assert medexp.url or str(medexp.specifier) == "==0.1.0", medexp


def test_models_uri_and_runs_uri_give_the_same_labels(store, tmp_path):
    by_run = labels(store, tmp_path / "a")
    by_name = labels(store, tmp_path / "b", "models:/hostile/1")
    np.testing.assert_array_equal(by_run, by_name)
    segmenter = load_segmenter(store.runs_uri, store.uri)
    np.testing.assert_array_equal(by_run, segmenter.segment(store.image[None], store.affine))


def _evil_mlmodel(workdir: Path, marker: Path) -> Path:
    """An MLmodel + python_model.pkl that MLflow's loader unpickles: made by mlflow.pyfunc.save_model for
    a harmless PythonModel, then its pickle replaced by a payload."""
    folder = workdir / "evil"
    mlflow.pyfunc.save_model(str(folder), python_model=mlflow.pyfunc.PythonModel())
    (folder / "python_model.pkl").write_bytes(pickle.dumps(Payload(f"touch {marker}")))
    return folder


def test_rewriting_any_other_file_of_the_model_cannot_change_what_predict_runs(store, tampering, tmp_path):
    before = labels(store, tmp_path / "before")
    evil = _evil_mlmodel(tmp_path, store.marker)
    shutil.copy(evil / "MLmodel", tampering / "MLmodel")
    shutil.copy(evil / "python_model.pkl", tampering / "python_model.pkl")
    code = f"import pathlib; pathlib.Path({str(store.marker)!r}).touch()\n"
    (tampering / "model_code.py").write_text(code)  # the PUT .../artifacts/model_code.py
    (tampering / "code" / "medexp").mkdir(parents=True)
    (tampering / "code" / "medexp" / "__init__.py").write_text(code)  # a medexp to shadow the installed one
    for name in ("requirements.txt", "python_env.yaml", "conda.yaml", "input_example.json"):
        if (tampering / name).exists():
            (tampering / name).write_text("evil-package==6.6.6\n")
    with tracking(store.uri), contextlib.suppress(Exception):
        mlflow.pyfunc.load_model(store.runs_uri)  # control: MLflow's own loader trusts MLmodel
    assert store.marker.exists(), "control: loading the rewritten model with mlflow.pyfunc runs the payload"
    store.marker.unlink()
    after = labels(store, tmp_path / "after")
    assert not store.marker.exists(), "medexp predict ran nothing of the store"
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_a_payload_in_the_model_config_is_refused(store, tampering, tmp_path, kind: str):
    config = tampering / DATA_DIR / "config.yaml"
    text = hostile_yaml(config.read_text(), kind, store.marker)
    with contextlib.suppress(Exception):
        build_model(from_yaml(text), 1, 6, 3)  # control: built without the guard, the payload runs
    assert store.marker.exists(), f"control: the {kind} payload runs"
    os.rmdir(store.marker) if store.marker.is_dir() else store.marker.unlink()
    config.write_text(text)
    args = ["predict", store.runs_uri, "-i", str(store.scan), "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--tracking-uri", store.uri])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"medexp predict: error: {store.runs_uri}/{DATA_DIR}/config.yaml: model.dropout"
    )
    with tracking(store.uri), pytest.raises(ConfigError, match="model.dropout"):
        mlflow.pyfunc.load_model(store.runs_uri)  # pyfunc callers get medexp's loader, and its refusal
    assert not store.marker.exists() and not (tmp_path / "o").exists()


def test_pickled_weights_are_refused(store, tampering, tmp_path):
    torch.save({"w": Payload(f"touch {store.marker}")}, tampering / DATA_DIR / "weights.pt")
    with pytest.raises(DataError, match=r"weights.pt: refused: the file needs code to load") as err:
        labels(store, tmp_path / "o")
    assert "\n" not in str(err.value) and not store.marker.exists()


def test_pyfunc_predict_needs_the_affine(store):
    with tracking(store.uri):
        model = mlflow.pyfunc.load_model(store.runs_uri)
    image = store.image[None]  # (1, X, Y, Z)
    for params in (None, {}, {"affine": []}, {"affine": [1.0, 0.0, 0.0]}):
        with pytest.raises(Exception, match=r"params\['affine'\]: required") as err:
            model.predict(image, params=params)
        assert "identity is never assumed" in str(err.value)
    given = model.predict(image, params={"affine": store.affine.ravel().tolist()})
    expected = load_segmenter(store.runs_uri, store.uri).segment(image, store.affine)
    np.testing.assert_array_equal(given, expected)
