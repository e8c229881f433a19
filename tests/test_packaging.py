"""Packaging declares its data: every conf/ folder and the C sources are packages of the wheel, so
setuptools installs them without its "Package would be ignored" warning."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def test_every_data_folder_is_a_listed_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    conf = ROOT / "conf"
    wanted = {"medexp.conf"} | {
        "medexp.conf." + ".".join(p.relative_to(conf).parts) for p in conf.rglob("*") if p.is_dir()
    }
    wanted.add("medexp.nn.fast.csrc")
    assert wanted - listed == set(), "add these to [tool.setuptools] packages"
    assert setuptools["package-dir"] == {"medexp.conf": "conf"}
    assert setuptools["package-data"]["*"] == ["*.yaml"]
    assert setuptools["package-data"]["medexp.nn.fast.csrc"] == ["*.c", "*.h"]
