"""A wheel says which commit it was built from (tools/build_backend.py), so a run of an installed medexp
(no checkout) still records mlflow.source.git.commit."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_reports_the_commit_it_was_built_from(tmp_path):
    source = tmp_path / "src"  # a copy: building in place would write build/ and egg-info into the checkout
    for folder in ("medexp", "conf", "tools"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    env = {**os.environ, "GIT_DIR": str(REPO / ".git")}  # the copy's commit is the checkout's HEAD
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    pip = [sys.executable, "-m", "pip", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)]
    subprocess.run(build, check=True, env=env, capture_output=True)
    assert not (source / "medexp" / "_build_info.json").exists(), "the stamp lives in the wheel only"
    (wheel,) = (tmp_path / "dist").glob("medexp-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True)  # fmt: skip
    code = "import medexp, medexp.tracking.store as s; print(medexp.__file__); print(s.git_commit())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env = {**clean, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, env=env
    )
    location, commit = out.stdout.split()
    assert location.startswith(str(tmp_path / "site")) and commit == head
