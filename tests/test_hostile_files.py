"""Hostile files are refused with one line and nothing runs (docs/design.md §9, docs/faults.md "Hostile
files"): checkpoints with a pickle payload, stored configs (checkpoint, start record, Hydra's files, MLflow
model) whose `_target_` or interpolation would run a command, and output paths of `medexp predict` that
would leave `-o`, follow a symbolic link, overwrite an input or collide.

Each payload, if it ran, would create its marker; the controls show that it does when the same config is
built without medexp's guard (so these tests can fail), the tests show that `resume` (by file, folder and
run id, from a checkpoint, a start record or `.hydra/`), `evaluate` and `predict` never get that far.
The MLflow-model attacks are in tests/test_model_store.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra.utils
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import Payload, run_medexp
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from typer.testing import CliRunner

from medexp.cli import app
from medexp.commands.predict import check_outputs, output_path, place, placing, predict
from medexp.config.build import build_model, build_optimizer, build_scheduler
from medexp.config.compose import compose_config
from medexp.config.flat import from_yaml
from medexp.config.untrusted import TRUSTED_TARGETS_ENV, conf_targets, load_config
from medexp.data.base import DatasetInfo
from medexp.data.demo import label_names
from medexp.errors import ConfigError, DataError
from medexp.run import checkpoint
from medexp.run.records import checkpoint_state
from medexp.run.restore import RECORD_FILE, restore, restore_for_resume

SHAPE = [16, 16, 16]
# model.dropout payloads of the issue: each would create `marker` when the config is built. The first hides
# its target in an interpolation (invisible to a check of the unresolved text), the others name functions
# under the once-trusted prefixes monai. and torch.
PAYLOADS = {
    "oc.decode": lambda marker: f"${{oc.decode:'{{_target_: os.makedirs, name: {marker}}}'}}",
    "run_cmd": lambda marker: {"_target_": "monai.utils.misc.run_cmd", "cmd_list": ["touch", str(marker)]},
    "exec_with_source": lambda marker: {
        "_target_": "torch.fx.graph_module._exec_with_source",
        "src": f"import pathlib; pathlib.Path({str(marker)!r}).touch()",
        "globals": {},
        "_convert_": "all",  # exec() needs a real dict as its globals
    },
}
# kernel payloads: os.system (which Hydra itself also blocklists) and os.makedirs (which Hydra would run)
KERNELS = {
    "os.system": lambda marker: {"_target_": "os.system", "_args_": [f"touch {marker}"]},
    "os.makedirs": lambda marker: {"_target_": "os.makedirs", "_args_": [str(marker)]},
}
CONFIG_KINDS = [*PAYLOADS, *KERNELS]
KINDS = ["pickle", *CONFIG_KINDS]


def hostile_yaml(config_yaml: str, kind: str, marker: Path) -> str:
    """The stored config text with the payload `kind` in model.dropout (or as the kernel)."""
    data = yaml.safe_load(config_yaml)
    if kind in PAYLOADS:
        data["model"]["dropout"] = PAYLOADS[kind](marker)
    else:
        data["kernel"] = KERNELS[kind](marker)
    return yaml.safe_dump(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A genuine checkpoint (untrained weights, exactly the payload training writes); for every payload
    kind the same checkpoint with the payload in its config, a start record and a `.hydra/` folder with it
    (no checkpoint), and MLflow runs whose `medexp.output_dir` are those folders; one checkpoint that
    pickles a call to os.system."""
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
    out = SimpleNamespace(root=root, marker=root / "PAYLOAD_RAN", scan=root / "scan.nii.gz", state=state)
    out.uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), out.scan)
    out.clean = checkpoint.save_atomic(state, root / "clean" / "checkpoints" / "best.pt")
    out.ckpt, out.record, out.hydra, out.run_of = {}, {}, {}, {}
    client = MlflowClient(out.uri)
    experiment = client.create_experiment("hostile", artifact_location=(root / "store" / "art").as_uri())
    for kind in CONFIG_KINDS:
        text = hostile_yaml(state["config"], kind, out.marker)
        out.ckpt[kind] = checkpoint.save_atomic(
            {**state, "config": text}, root / f"ckpt-{kind}" / "checkpoints" / "best.pt"
        )
        folder = root / f"record-{kind}"
        folder.mkdir()
        (folder / RECORD_FILE).write_text(json.dumps({"config": text, "job": {"overrides": []}}))
        out.record[kind] = folder
        folder = root / f"hydra-{kind}" / ".hydra"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(text)
        hydra_yaml = {"hydra": {"mode": "RUN", "runtime": {"choices": {}}, "overrides": {"task": []}}}
        (folder / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
        out.hydra[kind] = folder.parent
        for where, path in (("ckpt", out.ckpt[kind].parent.parent), ("record", out.record[kind])):
            run = client.create_run(experiment, tags={"medexp.output_dir": str(path)})
            client.set_terminated(run.info.run_id, "KILLED")
            out.run_of[where, kind] = run.info.run_id
    out.ckpt["pickle"] = root / "ckpt-pickle" / "checkpoints" / "best.pt"
    out.ckpt["pickle"].parent.mkdir(parents=True)
    torch.save({**state, "model": Payload(f"touch {out.marker}")}, out.ckpt["pickle"])
    return out


@pytest.fixture
def no_marker(files):
    """Every test starts, and must end, without the marker."""
    assert not files.marker.exists()
    yield files.marker
    assert not files.marker.exists(), "a payload ran"


def _remove(marker: Path) -> None:
    if marker.is_dir():
        marker.rmdir()
    else:
        marker.unlink()


@pytest.mark.parametrize("kind", [k for k in CONFIG_KINDS if k != "os.system"])  # Hydra blocks os.system
def test_controls_each_config_payload_runs_when_built_without_the_guard(files, kind: str):
    """medexp's own build_model on the stored config as read before (from_yaml, the allowlist of prefixes
    passing monai./torch. and the unresolved text) creates the marker, then reports "cannot build"."""
    stored = from_yaml(checkpoint.load(files.ckpt[kind])["config"])
    container = OmegaConf.to_container(stored, resolve=False)
    old_prefixes = ("medexp.", "monai.", "torch.")
    old_guard = [t for t in _targets(container) if not t.startswith(old_prefixes)]
    assert old_guard == ([] if kind in PAYLOADS else [kind]), "what the old prefix check saw"
    try:
        if kind in PAYLOADS:
            build_model(stored, 1, 6, 3)
        else:
            hydra.utils.instantiate(OmegaConf.to_container(stored.kernel, resolve=True))
    except Exception:  # noqa: BLE001 - the payload's return value does not make a network: it ran anyway
        pass
    assert files.marker.exists(), f"the {kind} payload ran"
    _remove(files.marker)


@pytest.mark.slow  # a child process that imports torch
def test_control_the_pickle_payload_is_live(files):
    code = f"import torch; torch.load({str(files.ckpt['pickle'])!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert files.marker.exists(), "unpickling the crafted file runs os.system"
    _remove(files.marker)


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    return [t for v in node for t in _targets(v)] if isinstance(node, list) else []


def _expected(kind: str, source) -> tuple[type, str]:
    if kind == "pickle":
        return checkpoint.RefusedCheckpoint, "refused"
    if kind == "oc.decode":
        return ConfigError, "model.dropout=.*interpolations and resolvers are refused"
    key = "model.dropout._target_" if kind in PAYLOADS else "kernel._target_"
    return ConfigError, f"{key}=.*not a target that medexp's conf/ names"


def _one_line(err, source) -> None:
    assert str(source) in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_restore_and_resume_from_a_checkpoint_refuse_before_anything_runs(files, kind: str, no_marker):
    path = files.ckpt[kind]
    calls = [
        lambda: restore(str(path), "best"),  # evaluate, predict
        lambda: restore_for_resume(str(path)),  # resume=FILE
        lambda: restore_for_resume(str(path.parent.parent)),  # resume=DIR
    ]
    if kind != "pickle":
        calls.append(lambda: restore_for_resume(files.run_of["ckpt", kind], files.uri))  # resume=RUN_ID
        calls.append(lambda: restore(files.run_of["ckpt", kind], "best", files.uri))  # evaluate RUN_ID
    for call in calls:
        cls, match = _expected(kind, path)
        with pytest.raises(cls, match=match) as err:
            call()
        _one_line(err, path)


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_resume_from_a_start_record_or_hydra_files_refuses(files, kind: str, no_marker):
    """Killed before its first checkpoint: the config comes from medexp_run.json or .hydra/config.yaml."""
    record = files.record[kind] / RECORD_FILE
    hydra_config = files.hydra[kind] / ".hydra" / "config.yaml"
    for call, source in (
        (lambda: restore_for_resume(str(files.record[kind]), files.uri), record),
        (lambda: restore_for_resume(files.run_of["record", kind], files.uri), record),
        (lambda: restore_for_resume(str(files.hydra[kind]), files.uri), hydra_config),
    ):
        cls, match = _expected(kind, source)
        with pytest.raises(cls, match=match) as err:
            call()
        _one_line(err, source)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_with_one_line(files, kind: str, command: str, tmp_path, no_marker):
    args = [command, str(files.ckpt[kind]), "--tracking-uri", files.uri]
    if command == "predict":
        args += ["-i", str(files.scan), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"medexp {command}: error: {files.ckpt[kind]}"), lines
    assert "Traceback" not in result.output and "cannot build" not in result.output
    assert not (tmp_path / "out").exists(), "nothing written"


def test_evaluate_by_run_id_refuses_with_one_line(files, no_marker):
    result = CliRunner().invoke(
        app, ["evaluate", files.run_of["ckpt", "run_cmd"], "--tracking-uri", files.uri]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(f"medexp evaluate: error: {files.ckpt['run_cmd']}: model.dropout")


def test_the_list_is_exact_and_derived_from_conf(monkeypatch):
    """conf/'s targets pass, their prefixes admit nothing else, MEDEXP_TRUSTED_TARGETS adds exact names."""
    assert {"medexp.nn.wong.WongNet", "torch.optim.NAdam", "medexp.losses.PCCLoss"} <= conf_targets()
    assert "monai.utils.misc.run_cmd" not in conf_targets() and "os.makedirs" not in conf_targets()
    text = "model: {_target_: mypkg.nets.MyNet}\n"
    with pytest.raises(ConfigError, match="model._target_='mypkg.nets.MyNet' is not a target"):
        load_config(text, "stored.yaml")
    monkeypatch.setenv(TRUSTED_TARGETS_ENV, "mypkg.nets.MyNet")
    assert load_config(text, "stored.yaml").model._target_ == "mypkg.nets.MyNet"
    with pytest.raises(ConfigError, match="model._target_='mypkg.nets.Other' is not a target"):
        load_config("model: {_target_: mypkg.nets.Other}\n", "stored.yaml")
    monkeypatch.setenv(TRUSTED_TARGETS_ENV, "mypkg.")
    with pytest.raises(ConfigError, match="exact names only, no prefixes"):
        load_config(text, "stored.yaml")


@pytest.mark.parametrize(
    "text, key",
    [
        ("lr: ${oc.env:HOME}\n", "lr="),  # a resolver
        ("experiment_name: run-${seed}\n", "experiment_name="),  # an interpolation inside a string
        ("eval: {metrics: ['${oc.decode:x}']}\n", r"eval.metrics\[0\]="),  # in a list
        ("'${oc.env:HOME}': 1\n", "key"),  # in a key
        ("dataset: {root: '${output_root}/data'}\n", "dataset.root="),  # conf/'s own: not in a checkpoint
    ],
)
def test_every_interpolation_is_refused_in_a_stored_config(text: str, key: str):
    with pytest.raises(ConfigError, match=f"^stored.yaml: {key}") as err:
        load_config(text, "stored.yaml")
    assert "\n" not in str(err.value)


def test_a_start_record_may_keep_conf_own_interpolations_at_their_own_keys():
    """Hydra's .hydra/config.yaml is unresolved: conf/'s `dataset.root: ${output_root}/data` passes there,
    the same text under another key does not."""
    ok = load_config("dataset: {root: '${output_root}/data'}\n", "r.json", own_interpolations=True)
    assert OmegaConf.to_container(ok.dataset, resolve=False) == {"root": "${output_root}/data"}
    with pytest.raises(ConfigError, match="model.dropout="):
        load_config("model: {dropout: '${output_root}/data'}\n", "r.json", own_interpolations=True)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "where, kind",
    [
        ("ckpt-file", "pickle"),
        ("ckpt-dir", "oc.decode"),
        ("run-id", "run_cmd"),
        ("record", "exec_with_source"),
    ],
)
def test_medexp_train_resume_refuses_with_one_line_and_starts_no_run(files, where, kind, tmp_path, no_marker):
    if where == "record":
        source, named = files.record[kind], files.record[kind] / RECORD_FILE
    else:
        named = files.ckpt[kind]
        by_path = {"ckpt-file": named, "ckpt-dir": named.parent.parent}
        source = by_path[where] if where in by_path else files.run_of["ckpt", kind]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if where != "run-id" else files.uri
    args = ["train", f"resume={source}", "trainer.progress=false", f"tracking_uri={uri}"]
    result = run_medexp(args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "cannot build" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and errors[0].startswith(f"medexp train: error: {named}"), errors
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids)
    assert all(r.info.status != "RUNNING" for r in runs), "no run was started or reopened"
    if where != "run-id":
        assert runs == [], "no MLflow run was started"


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
    (out / "inside.nii.gz").symlink_to(out / "other.nii.gz")
    with pytest.raises(DataError, match="is a link"):
        check_outputs([("inside.nii.gz", [scans / "inside.nii.gz"])], out)
    with pytest.raises(DataError, match="would overwrite the input"):
        check_outputs([("a.nii.gz", [scans / "a.nii.gz"])], scans)
    same_case = [("a.nii.gz", [tmp_path / "x" / "a.nii.gz"]), ("a.nii.gz", [tmp_path / "y" / "a.nii.gz"])]
    with pytest.raises(DataError, match="both"):
        check_outputs(same_case, tmp_path / "z")
    check_outputs([("a.nii.gz", [scans / "a.nii.gz"]), ("b.nii.gz", [scans / "b.nii.gz"])], out)  # fine


def test_probabilities_of_x_and_an_input_named_x_probabilities_collide(tmp_path: Path):
    """x.nii.gz writes x_probabilities.nii.gz, which is also the label map of the input
    x_probabilities.nii.gz: refused with --probabilities, fine without."""
    cases = [("x.nii.gz", [tmp_path / "x.nii.gz"]), ("x_probabilities.nii.gz", [tmp_path / "xp.nii.gz"])]
    check_outputs(cases, tmp_path / "out")
    with pytest.raises(DataError, match=r"x_probabilities.nii.gz: both .* would be written there") as err:
        check_outputs(cases, tmp_path / "out", probabilities=True)
    assert "\n" not in str(err.value)
    upper = [("X.nii.gz", [tmp_path / "a" / "X.nii.gz"]), ("x.nii.gz", [tmp_path / "x.nii.gz"])]
    with pytest.raises(DataError, match="both"):  # one file on a case-insensitive filesystem
        check_outputs(upper, tmp_path / "out")


def test_control_a_plain_write_follows_a_link_and_place_replaces_it(tmp_path: Path):
    """What predict wrote before: nib.save on out/<name> writes through a link placed there. Now every
    file is written in a private folder and os.replace'd over the name: the link itself is replaced."""
    out, outside = tmp_path / "out", tmp_path / "precious"
    out.mkdir()
    outside.write_bytes(b"precious")
    (out / "a_probabilities.nii.gz").symlink_to(outside)
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    nib.save(image, str(out / "a_probabilities.nii.gz"))
    assert outside.read_bytes() != b"precious", "control: the plain write went through the link"
    outside.write_bytes(b"precious")
    with placing(out) as tmp:
        assert tmp.parent == out and oct(tmp.stat().st_mode & 0o777) == "0o700"
        nib.save(image, str(tmp / "a_probabilities.nii.gz"))
        place(tmp, out)
    assert outside.read_bytes() == b"precious"
    assert not (out / "a_probabilities.nii.gz").is_symlink()
    assert nib.load(out / "a_probabilities.nii.gz").shape == (2, 2, 2)
    assert sorted(p.name for p in out.iterdir()) == ["a_probabilities.nii.gz"], "the private folder is gone"


@pytest.mark.parametrize("link", ["case.nii.gz", "case_probabilities.nii.gz"])
def test_predict_refuses_a_symlink_in_the_output_folder_and_writes_nothing(files, tmp_path: Path, link):
    scans, out, outside = tmp_path / "scans", tmp_path / "masks", tmp_path / "precious.nii.gz"
    scans.mkdir()
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), scans / "case.nii.gz")
    nib.save(nib.Nifti1Image(image, np.eye(4)), scans / "other.nii.gz")
    outside.write_bytes(b"precious")
    out.mkdir()
    (out / link).symlink_to(outside)
    with pytest.raises(DataError, match="leads outside -o"):
        predict(str(files.clean), [str(scans)], str(out), probabilities=True, tracking_uri=files.uri)
    assert outside.read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == [link], "not even the other case was written"


def test_predict_refuses_colliding_inputs_before_writing(files, tmp_path: Path):
    scans, out = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    for name in ("x.nii.gz", "x_probabilities.nii.gz"):
        nib.save(nib.Nifti1Image(image, np.eye(4)), scans / name)
    args = ["predict", str(files.clean), "-i", str(scans), "-o", str(out), "--tracking-uri", files.uri]
    result = CliRunner().invoke(app, [*args, "--probabilities"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "x_probabilities.nii.gz: both" in lines[0], lines
    assert not out.exists(), "nothing written"
    written = predict(str(files.clean), [str(scans)], str(out), tracking_uri=files.uri)  # no collision
    assert sorted(p.name for p in written) == ["x.nii.gz", "x_probabilities.nii.gz"]
