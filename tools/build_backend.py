"""PEP 517 build backend of medexp: setuptools' own, plus the git commit written into wheels and sdists.

A wheel carries no .git folder, so an installed medexp could not say which code it is; this backend
writes `medexp/_build_info.json` ({"git_commit": HEAD}) for the duration of a wheel or sdist build when the
source is a git checkout (an sdist built from a checkout passes it on to the wheels built from it), and
medexp.tracking.store.git_commit reads it. Editable installs run from the checkout and need no stamp.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every other hook is setuptools' own

STAMP = Path(__file__).resolve().parents[1] / "medexp" / "_build_info.json"


@contextlib.contextmanager
def _stamped():
    """medexp/_build_info.json with the checkout's HEAD while the block runs (kept if it was there)."""
    if STAMP.exists():  # an sdist's stamp: the commit it was built from
        yield
        return
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=STAMP.parent, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    if not head:
        yield
        return
    STAMP.write_text(json.dumps({"git_commit": head}))
    try:
        yield
    finally:
        STAMP.unlink(missing_ok=True)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with _stamped():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    with _stamped():
        return _setuptools.build_sdist(sdist_directory, config_settings)
