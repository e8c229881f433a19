"""What `resume` continues from (docs/design.md §9): the newest complete checkpoint, a best.pt repaired
after a kill between the two writes, and, before the first checkpoint, the job's start record or Hydra's
own files. (The end-to-end kills are tests/test_kill_anywhere.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medexp.config.compose import compose_config
from medexp.config.flat import to_yaml
from medexp.errors import DataError
from medexp.run import checkpoint
from medexp.run.restore import RECORD_FILE, restore_for_resume, write_record

pytestmark = pytest.mark.slow  # opens a sqlite store (MLflow's migrations take seconds)

OVERRIDES = ["dataset.shape=[16,16,16]", "lr=0.003", "trainer.progress=false"]


@pytest.fixture(scope="module")
def composed():
    return compose_config(OVERRIDES, hydra_cfg=True)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def save(folder: Path, name: str, cfg, epoch: int, val: float, best: float) -> Path:
    """A checkpoint with what resume reads (the weights do not matter here)."""
    state = {"config": to_yaml(cfg), "epoch": epoch, "best": best, "metrics": {"val/dice_mean": val}}
    return checkpoint.save_atomic({**state, "run_id": None}, folder / "checkpoints" / name)


def job_config(composed):
    """The job's config as Hydra hands it to the task (without the `hydra` node)."""
    container = OmegaConf.to_container(composed, resolve=False)
    container.pop("hydra")
    return OmegaConf.create(container)


def test_hydra_files_alone_restart_the_job_from_scratch(tmp_path: Path, composed, uri: str):
    """Killed between Hydra creating the folder and the job's first line: only .hydra/ is there."""
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(job_config(composed), tmp_path / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": composed.hydra}, tmp_path / ".hydra" / "hydra.yaml")
    restored = restore_for_resume(str(tmp_path), uri)
    assert restored.state is None and restored.run_id is None, "no checkpoint, no MLflow run yet"
    assert restored.cfg.lr == 0.003
    assert restored.job["overrides"] == ["dataset.shape=[16,16,16]", "lr=0.003"], "its identity, as tagged"
    assert restored.job["choices"]["loss"] == "pcc"


def test_the_start_record_restarts_the_job_from_scratch(tmp_path: Path, composed, uri: str):
    job = {"choices": {"loss": "dice"}, "overrides": ["lr=0.003"], "parent_run_id": None}
    write_record(tmp_path, OmegaConf.to_yaml(job_config(composed)), job)
    restored = restore_for_resume(str(tmp_path), uri)
    assert restored.state is None and restored.job == job and restored.cfg.lr == 0.003


def test_a_best_pt_the_kill_did_not_reach_is_repaired(tmp_path: Path, composed):
    save(tmp_path, "best.pt", job_config(composed), epoch=1, val=0.4, best=0.4)
    last = save(tmp_path, "last.pt", job_config(composed), epoch=2, val=0.6, best=0.6)  # epoch 2: new best
    stale = last.with_name(".best.pt.123.link.tmp")
    stale.write_bytes(b"half")
    restored = restore_for_resume(str(tmp_path))
    assert restored.path == last and restored.state["epoch"] == 2
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["epoch"] == 2
    assert not stale.exists()


def test_a_best_pt_of_an_earlier_best_epoch_is_kept(tmp_path: Path, composed):
    save(tmp_path, "best.pt", job_config(composed), epoch=1, val=0.7, best=0.7)
    save(tmp_path, "last.pt", job_config(composed), epoch=2, val=0.5, best=0.7)
    restore_for_resume(str(tmp_path))
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["epoch"] == 1


def test_the_newest_complete_checkpoint_is_the_resume_point(tmp_path: Path, composed):
    best = save(tmp_path, "best.pt", job_config(composed), epoch=3, val=0.7, best=0.7)
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 cut short")  # unreadable
    restored = restore_for_resume(str(tmp_path))
    assert restored.path == best and restored.state["epoch"] == 3


def test_nothing_to_resume_is_one_line(tmp_path: Path, uri: str):
    with pytest.raises(DataError, match=f"nothing to resume: no checkpoint and no {RECORD_FILE}"):
        restore_for_resume(str(tmp_path), uri)
