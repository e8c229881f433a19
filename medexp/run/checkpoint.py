"""Checkpoints: written atomically (temp file + fsync + rename), read with torch.load(weights_only=True).

A checkpoint holds model, optimizer and scheduler state, the epoch, the best validation score, the RNG
states (as tensors/lists so weights_only loading accepts them), the resolved config (YAML text) and the
MLflow run id.

Order (docs/design.md §9, "Checkpoints"): every epoch writes `last.pt`, the resume point, first; on a new
best validation score `best.pt` then becomes the same file (`share_atomic`: a hard link, or a copy where
the filesystem has none). A SIGKILL at any instant therefore leaves either the previous or the new
`last.pt`, complete, and at worst a stale `.*.tmp` (removed by `remove_stale_temp` on resume). A failed
write (full disk, quota, file-size limit) is a one-line DataError naming the file; the previous file is
untouched. A file that needs code to load (a pickle payload) is refused with a one-line DataError.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medexp.errors import DataError


class RefusedCheckpoint(DataError):
    """A file that torch.load(weights_only=True) refuses: it would run code (a pickle payload)."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, rename over `path`: never a half-written file.

    Raises:
        DataError: the write failed (e.g. no space left); the temp file is removed, `path` is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            out = _WriteErrors(f)
            try:
                torch.save(state, out)
            except RuntimeError as err:  # torch's zip writer hides the OSError of the failed write
                if out.error is None:
                    raise
                raise out.error from err
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def share_atomic(source: str | Path, path: str | Path) -> Path:
    """Make `path` the same file as `source` (best.pt from last.pt), atomically: a hard link to a temp name
    renamed over `path` (no copy, no extra space); a copy where the filesystem has no hard links.

    last.pt is only ever replaced by a rename, never written in place, so the link keeps this epoch's
    content when the next last.pt arrives.
    """
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err) from err
    return path


def remove_stale_temp(folder: str | Path) -> list[Path]:
    """Delete the `.*.tmp` files an interrupted write left in a checkpoint folder (call only while no other
    process writes there: on resume, before training starts). Returns what was removed."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by save_atomic (weights_only: no arbitrary code runs).

    Args:
        mmap: map the tensors instead of reading them (cheap look at epoch and scores).

    Raises:
        DataError: the file holds anything but tensors and plain values (e.g. a pickled function), or is
            not a checkpoint at all; one line naming the file.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1])
        raise RefusedCheckpoint(
            f"{path}: refused: the file needs code to load, not only tensors ({detail})"
        ) from err
    except Exception as err:  # a truncated or foreign file: torch raises RuntimeError, KeyError, EOFError...
        raise DataError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"[:500]) from err
    if not isinstance(state, dict) or not isinstance(state.get("config"), str):
        raise DataError(f"{path}: not a medexp checkpoint (no stored config)")
    return state


class _WriteErrors(io.RawIOBase):
    """A binary file that remembers the OSError of a failed write, which torch.save turns into a bare
    "unexpected pos" RuntimeError."""

    def __init__(self, file) -> None:
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_error(path: Path, err: OSError) -> DataError:
    return DataError(f"{path}: cannot write the checkpoint ({err.strerror or err}); the previous one is kept")
