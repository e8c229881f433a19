"""Start-up of the `medexp` command: checking a config, printing it, a user error and `--version` load no
torch, MONAI or MLflow (those load where they are used: a run, a model, a store), and `--config-dir`
reaches the pre-flight check as it reaches Hydra. Timings are in docs/performance.md ("CLI start-up");
these tests check the imports, not the clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_medexp

from medexp.config.compose import check
from medexp.errors import ConfigError

HEAVY = ("torch", "monai", "mlflow", "optuna", "matplotlib")


def _loaded_after(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter and return {"heavy": [heavy modules loaded], "out": its print}."""
    script = (
        "import io, json, sys, contextlib\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'out': out.getvalue()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_control_the_probe_sees_a_heavy_import(tmp_path: Path):
    """CONTROL: the same probe reports torch and MONAI once the metrics module (which needs them) loads."""
    found = _loaded_after("import medexp.evaluation.metrics", tmp_path)
    assert {"torch", "monai"} <= set(found["heavy"])


def test_compose_and_validate_with_overrides_load_no_heavy_module(tmp_path: Path):
    code = (
        "from medexp.config.compose import compose_config\n"
        "from medexp.config.validate import validate\n"
        "cfg = compose_config(['kernel=mixed', 'loss=dice', 'lr=1e-2', 'eval.metrics=[dice,hd95]'])\n"
        "validate(cfg)\n"
        "print(cfg.kernel._target_, cfg.lr)"
    )
    found = _loaded_after(code, tmp_path)
    assert found["heavy"] == [] and "medexp.nn.kernels.MixedKernels 0.01" in found["out"]


def test_a_user_error_and_a_printed_config_load_no_heavy_module(tmp_path: Path):
    """The CLI itself, in-process: `train kernel=nope` (exit 2, one line) and `train --cfg job`."""
    for argv, expected in (
        (["train", "kernel=nope"], "medexp train: error: kernel=nope: unknown choice"),
        (["train", "--cfg", "job", "loss=dice"], "_target_: medexp.losses.DiceLoss"),
        (["--version"], "medexp 0.1.0"),
    ):
        code = (
            "from medexp.cli import app\n"
            f"try: app({argv!r}, prog_name='medexp')\n"
            "except SystemExit as stop: print('exit', stop.code)"
        )
        found = _loaded_after(code, tmp_path)
        assert found["heavy"] == [], (argv, found)
        assert expected in found["out"], (argv, found["out"])
    assert list(tmp_path.iterdir()) == [], "nothing written: no store, no outputs folder"


def _user_config_dir(tmp_path: Path) -> Path:
    conf = tmp_path / "myconf"
    (conf / "loss").mkdir(parents=True)
    (conf / "loss" / "mine.yaml").write_text("_target_: medexp.losses.DiceLoss\ninclude_background: false\n")
    return conf


def test_config_dir_choices_pass_the_preflight_check(tmp_path: Path):
    conf = _user_config_dir(tmp_path)
    assert check(["--config-dir", str(conf), "loss=mine"]) == 1
    assert check([f"--config-dir={conf}", "-m", "loss=pcc,mine"]) == 2
    with pytest.raises(ConfigError, match=r"loss=mine: unknown choice; allowed: bwce"):
        check(["loss=mine"])  # CONTROL: without the folder the choice does not exist
    with pytest.raises(ConfigError, match=r"loss=nope: unknown choice; allowed: .*, mine, pcc"):
        check(["-cd", str(conf), "loss=nope"])
    with pytest.raises(ConfigError, match=r"^--config-dir /nonexistent/conf: no such folder"):
        check(["--config-dir", "/nonexistent/conf", "loss=pcc"])


@pytest.mark.e2e
def test_config_dir_works_through_medexp_train(tmp_path: Path):
    conf = _user_config_dir(tmp_path)
    result = run_medexp(["train", "--config-dir", str(conf), "loss=mine", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "_target_: medexp.losses.DiceLoss\n  include_background: false" in result.stdout
