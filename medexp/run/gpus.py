"""GPUs pinned per sweep job (stock Hydra launchers run parallel jobs but do not pin devices).

With `sweep.gpus_per_job=g` each worker process of a parallel launcher (hydra/launcher=joblib) claims a
free slot the first time it runs a job - by taking an exclusive lock on <sweep dir>/.gpu_slots/slot<i>.lock,
held until the process exits - and exports CUDA_VISIBLE_DEVICES = the slot's GPUs (slot i gets GPUs
i*g .. i*g+g-1) before CUDA is initialised. n_jobs workers therefore never share a GPU, however jobs
finish and are re-dispatched.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

_held_slot: tuple[int, object] | None = None  # (slot, open lock file) of this process


def gpu_count() -> int:
    """GPUs on this machine, counted without initialising CUDA (nvidia-smi), or $MEDEXP_GPU_COUNT."""
    if os.environ.get("MEDEXP_GPU_COUNT"):
        return int(os.environ["MEDEXP_GPU_COUNT"])
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    return 0


def pin_gpus(gpus_per_job: int, sweep_dir: str | Path) -> str | None:
    """Claim a GPU slot for this worker process and export CUDA_VISIBLE_DEVICES; returns its value.

    Returns None when pinning is off (gpus_per_job <= 0) or the machine has no GPU.
    Raises RuntimeError when every slot is taken (more parallel jobs than GPUs / gpus_per_job).
    """
    global _held_slot
    if gpus_per_job <= 0:
        return None
    total = gpu_count()
    if total == 0:
        return None
    if _held_slot is None:
        slots = total // gpus_per_job
        if slots == 0:
            raise RuntimeError(f"sweep.gpus_per_job={gpus_per_job} but this machine has {total} GPU(s)")
        folder = Path(sweep_dir) / ".gpu_slots"
        folder.mkdir(parents=True, exist_ok=True)
        for slot in range(slots):
            handle = open(folder / f"slot{slot}.lock", "w")  # noqa: SIM115 - held for the process lifetime
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held_slot = (slot, handle)
            break
        else:
            raise RuntimeError(
                f"all {slots} GPU slot(s) are taken: lower hydra.launcher.n_jobs to <= {slots} "
                f"or gpus_per_job (now {gpus_per_job})"
            )
    slot = _held_slot[0]
    devices = ",".join(str(slot * gpus_per_job + i) for i in range(gpus_per_job))
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    return devices
