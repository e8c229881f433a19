"""User errors end with one line naming the key and what is allowed, exit code 2, no traceback, no run;
every path an override can take (a run, --cfg, --info, sweeps of every kind, Hydra's own groups) is checked
before Hydra starts. A user's own `_target_` on the command line is trusted: it fails only if it does not
import."""

import sys
from pathlib import Path

import pytest
from conftest import TINY, run_medexp

from medexp.config.build import build_model
from medexp.config.compose import check, compose_config
from medexp.errors import ConfigError


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("kernel=nope", "kernel=nope: unknown choice; allowed: conventional"),
        ("trainer.max_epoch=3", "trainer.max_epoch: unknown key 'max_epoch'; keys of trainer: accelerator"),
        ("lr=-1", "lr=-1.0: expected a positive number"),
        ("split=7", "split=7: expected an integer in 0..4"),
        ("lr=abc", "lr"),
        ("dataset.num_cases=2", "dataset.num_cases=2: expected an integer >= 3"),
        ("kernel.impl=fast", "kernel.impl=fast: expected one of auto, "),
    ],
)
def test_bad_override_is_one_line(tmp_path: Path, override: str, expected: str):
    result = run_medexp(["train", *TINY, override], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("medexp train: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs" / "mlflow.db").exists(), "no MLflow run (not even a store) was created"


@pytest.mark.e2e
def test_bad_value_inside_a_sweep_is_caught_before_any_job(tmp_path: Path):
    result = run_medexp(["train", "-m", "lr=1e-3,-1", "loss=pcc,nope", *TINY], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "loss=nope: unknown choice" in result.stderr or "lr=-1" in result.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--cfg", "job", "loss=dicee"], "loss=dicee: unknown choice; allowed: bwce, ce, dice"),
        (["--info", "loss=dicee"], "loss=dicee: unknown choice"),
        (["--info", "defaults", "kernel=nope"], "kernel=nope: unknown choice"),
        (["hydra/sweeper=nope"], "hydra/sweeper=nope: unknown choice; allowed: basic, optuna, optuna_search"),
        (["hydra/launcher=nope"], "hydra/launcher=nope: unknown choice; allowed: basic, joblib"),
        (["nosuchkey=1"], "nosuchkey: unknown key 'nosuchkey'; top-level keys: augment"),
        (
            ["lr=choice()"],
            "lr=choice(): cannot parse it (ValueError while evaluating 'choice()': empty choice",
        ),
        (["lr=[1,2"], "lr=[1,2: cannot parse it (no viable alternative at input '[1,2')"),
        (["lr=1e-3,1e-2"], "lr=1e-3,1e-2: a sweep needs -m (--multirun)"),
        (["-m", "hydra/sweeper=optuna", "lr=interval(-1, 1)"], "lr=-1.0: expected a positive number"),
        (["-m", "hydra/sweeper=optuna", "lr=tag(log, interval(1e-4, -1))"], "lr=-1.0: expected a positive"),
        (
            ["-m", "lr=interval(1e-4, 1e-2)"],
            "lr=interval(1e-4, 1e-2): an interval needs a sweeper that samples",
        ),
        (["-m", "lr=range(0.1, 0.3, 0.1)", "loss=pcc,nope"], "loss=nope: unknown choice"),
        (
            ["-m", "kernel=glob(x*)"],
            "kernel=glob(x*): matches no choice; allowed: conventional, gabor, mixed",
        ),
        (["-m", "kernel=choice(conventional, nope)"], "kernel=nope: unknown choice"),
        (["-m", "hydra/sweeper=optuna", "loss=choice(pcc, dicee)"], "loss=dicee: unknown choice"),
        (["-m", "hydra/sweeper=optuna_search", "loss=choice(pcc, dicee)"], "loss=dicee: unknown choice"),
        (
            ["model._target_=mypkg_not_installed.Net"],
            "model._target_=mypkg_not_installed.Net: cannot import it",
        ),
    ],
)
def test_every_override_path_is_one_line(args: list[str], expected: str):
    with pytest.raises(ConfigError) as err:
        check(args)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_users_own_target_is_trusted_when_it_imports(tmp_path: Path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("from medexp.nn.unet import UNet as Net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["model=unet", "model._target_=mypkg.Net", "model.channels=[4,8]"]
    assert check(args) == 1
    net = build_model(compose_config(args), in_channels=1, num_classes=3, spatial_dims=3)
    assert type(net).__module__ == "medexp.nn.unet" and sys.modules["mypkg"].Net is type(net)


@pytest.mark.e2e
def test_unimportable_target_fails_before_any_data_or_run(tmp_path: Path):
    result = run_medexp(["train", *TINY, "model._target_=mypkg.Net"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    expected = "medexp train: error: model._target_=mypkg.Net: cannot import it (ModuleNotFoundError: "
    assert result.stderr.strip().splitlines() == [f"{expected}No module named 'mypkg')"], result.stderr
    assert list(tmp_path.iterdir()) == [], "no demo data, no store, no run folder"


@pytest.mark.e2e
def test_hydra_help_names_the_app(tmp_path: Path):
    result = run_medexp(["train", "--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("medexp train: train and evaluate a segmentation model")
    assert (
        "== Config groups (group=choice) ==" in result.stdout
        and "kernel: conventional, gabor, mixed" in result.stdout
    )
    assert "powered by Hydra" not in result.stdout
