"""Files of the preprocessing cache: atomic writes (temp file + rename, so parallel jobs and DDP ranks never
read half a file), JSON records, fingerprints of source files and hashed cache keys.

Temp files are named `.<name>.<host>.<pid>.tmp`, so that a later run removes those of dead processes of
its own host (a kill mid-write) and leaves alone those still being written by a live job or another node.
A failed write (full disk, quota) is a one-line DataError naming the file; its temp file is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
from omegaconf import ListConfig, OmegaConf

from medexp.data.records import CaseFiles
from medexp.errors import DataError


def fingerprint(case: CaseFiles, root: Path) -> list:
    return [
        [str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in [*case.images, case.label]
    ]


def plain(value):
    """Config values (OmegaConf containers, tuples) as plain JSON-able Python."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, tuple) else value


def is_seq(value) -> bool:
    return isinstance(value, (list, tuple, ListConfig))


def hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "dataset"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def temp_path(path: Path) -> Path:
    """Where `path` is written before its rename: `.<name>.<host>.<pid>.tmp` in the same folder."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def is_stale(tmp: Path) -> bool:
    """Whether a temp file or folder (see `temp_path`) was left by a process of this host that is gone."""
    parts = tmp.name.rsplit(".", 2)  # [".<name>.<host>", "<pid>", "tmp"]
    if len(parts) != 3 or parts[2] != "tmp" or not parts[1].isdigit():
        return False
    if not parts[0].endswith(f".{socket.gethostname()}"):
        return False  # another node's (shared filesystem): it may still be writing
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temp(folder: Path) -> int:
    """Delete the temp files and folders that dead processes of this host left under `folder`."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if is_stale(p)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def write_failed(path: Path, err: OSError) -> DataError:
    """The one-line error of a failed cache write."""
    why = err.strerror or (os.strerror(err.errno) if err.errno else f"{err}: disk full or over quota?")
    return DataError(f"{path}: cannot write ({why}); free space or set dataset.cache_dir")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as f:
            write(f)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, err) from err


def write_json(path: Path, obj) -> None:
    """Atomic write (temp file + rename): parallel jobs and DDP ranks never see half a file."""
    text = json.dumps(obj, indent=1, default=str).encode()
    _atomic(path, lambda f: f.write(text))


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (see write_json)."""
    _atomic(path, lambda f: np.save(f, array))


def sizes(folder: Path, files: list[str]) -> list[int]:
    """Byte sizes of `files` (relative to `folder`), stored with a case's record as its completeness check."""
    return [(folder / f).stat().st_size for f in files]


def complete(folder: Path, files: list[str], expected: list[int] | None) -> bool:
    """Whether every file exists with the size recorded when it was written (any size for old records)."""
    try:
        found = sizes(folder, files)
    except OSError:
        return False
    return expected is None or found == list(expected)
