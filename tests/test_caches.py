"""Caches are never read half-written (docs/design.md §8): the NIfTI preprocessing cache and the generated
demo data survive a kill mid-write, a truncated file, stale temp files and a full disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.data import cache_io
from medexp.data.demo import DemoDataset, make_case
from medexp.data.nifti import NiftiDataset

LABELS = "dataset.labels={0:background,1:blob,2:corner}"


def write_folder(root: Path, n: int, size: int) -> Path:
    """n cases (images/ + labels/) of size^3 voxels: a noisy ball (1) and a corner block (2)."""
    grid = np.mgrid[:size, :size, :size]
    for i in range(n):
        rng = np.random.default_rng(i)
        label = (((grid - size / 2) ** 2).sum(0) < (size / 3) ** 2).astype(np.uint8)
        label[: size // 4, : size // 4] = 2
        image = 50.0 * label + rng.normal(0, 5, label.shape)
        for sub, array in (("images", image.astype(np.float32)), ("labels", label)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), root / sub / f"case{i:02d}.nii.gz")
    return root


def case_records(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cache / "cases").glob("*.json"))]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.e2e
def test_kill_during_nifti_preprocessing_then_rerun_trains_on_a_complete_cache(tmp_path: Path):
    n = 10
    root = write_folder(tmp_path / "scans", n, 64)
    args = ["train", "dataset=nifti", f"dataset.root={root}", LABELS, "dataset.shape=[16,16,16]"]
    args += ["trainer.max_epochs=1", "trainer.progress=false", "tracking.log_plots=false"]
    args += ["eval.metrics=[dice]", "experiment_name=nifti-kill"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medexp", *args], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((tmp_path / "outputs" / "cache").glob("*/cases/*_image.npy")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the first case's image array has just landed
    proc.wait()
    proc.stderr.close()
    (cache,) = (tmp_path / "outputs" / "cache").iterdir()
    done = sum("prep" in r for r in case_records(cache))
    assert done < n, "killed while preprocessing"

    rerun = run_medexp(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("nifti-kill").experiment_id])
    assert run.info.status == "FINISHED"
    records = case_records(cache)
    assert len(records) == n and all("prep" in r for r in records), "every case preprocessed"
    for record in records:
        prep = record["prep"]
        assert cache_io.complete(cache, prep["files"], prep["sizes"])
        assert np.load(cache / prep["files"][0]).shape == (1, 16, 16, 16)
    assert not list(cache.rglob(".*.tmp")), "temp files of the killed run removed"


def test_a_truncated_cached_array_is_rebuilt_not_read(tmp_path: Path):
    root = write_folder(tmp_path / "scans", 4, 20)
    dataset = NiftiDataset(root=str(root), shape=[8, 8, 8], cache_dir=str(tmp_path / "cache"))
    cases = dataset.prepare()
    image = Path(cases[1]["image"])
    expected = np.load(image)
    image.write_bytes(image.read_bytes()[:-100])  # as a write cut short would leave it
    live = image.with_name(f".{image.name}.{socket.gethostname()}.{os.getppid()}.tmp")  # a live process
    stale = image.with_name(f".{image.name}.{socket.gethostname()}.{dead_pid()}.tmp")
    live.write_bytes(b"being written")
    stale.write_bytes(b"left by a killed job")

    again = NiftiDataset(root=str(root), shape=[8, 8, 8], cache_dir=str(tmp_path / "cache"))
    again.prepare()
    assert again.stats["preprocessed"] == 1 and again.stats["reused"] == 3, again.stats
    np.testing.assert_array_equal(np.load(image), expected)
    assert live.exists() and not stale.exists(), "only a dead process's temp file is removed"


def test_half_made_demo_data_is_generated_again(tmp_path: Path):
    dataset = DemoDataset(root=str(tmp_path), num_cases=3, shape=[8, 8, 8], num_classes=3)
    half = dataset.folder / "imagesTr" / "case_000.nii.gz"
    half.parent.mkdir(parents=True)
    half.write_bytes(b"\x1f\x8b truncated")  # an older medexp killed while generating into the folder
    stale = cache_io.temp_path(dataset.folder).with_name(
        f".{dataset.folder.name}.{socket.gethostname()}.{dead_pid()}.tmp"
    )
    (stale / "imagesTr").mkdir(parents=True)

    cases = dataset.prepare()
    assert len(cases) == 3 and (dataset.folder / "dataset.json").exists()
    expected, _ = make_case(np.random.default_rng([0, 0]), (8, 8, 8), 3, 0.1)
    np.testing.assert_allclose(nib.load(cases[0]["image"]).get_fdata(), expected, rtol=1e-6)
    assert not stale.exists(), "the killed generator's temp folder is removed"
    assert not list(tmp_path.glob(".*.tmp")), "nothing else left behind"


def test_a_full_disk_while_writing_the_caches_is_one_line_and_leaves_no_file(tmp_path: Path):
    """RLIMIT_FSIZE in a child process stands in for a full disk or a quota."""
    code = f"""
import resource, sys
import numpy as np
from medexp.data import cache_io
from medexp.data.demo import DemoDataset
from medexp.errors import DataError
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
demo = DemoDataset(root={str(tmp_path / "demo")!r}, num_cases=2, shape=[64, 64, 64])
for write in (lambda: cache_io.save_npy(cache_io.Path({str(tmp_path)!r}) / "a.npy", np.zeros(10000)),
              demo.prepare):
    try:
        write()
    except DataError as err:
        print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert lines[0].startswith(f"{tmp_path / 'a.npy'}: cannot write (") and "free space" in lines[0]
    assert "demo3d-" in lines[1] and "cannot write (File too large)" in lines[1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["demo"], "no array, no temp file, no demo folder"
