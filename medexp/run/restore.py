"""Restore a run from its checkpoint: the one place that turns "an output folder, a checkpoint file or an
MLflow run id" into the run's config, checkpoint state and network. `medexp train resume=...`,
`medexp evaluate` and `medexp predict` all start here.

A checkpoint's or start record's config is data from elsewhere: it is refused, before anything is built or
resolved, when it holds an interpolation or a `_target_` outside the exact list
(medexp.config.untrusted.load_config), and checkpoints are read with torch.load(weights_only=True), so no
pickled code runs.

Resume (docs/design.md §9) continues from the newest complete checkpoint. Before the first one exists, the
job's start record (`medexp_run.json`, written by the Hydra job before anything else, or Hydra's own
`.hydra/` files if the kill came even earlier) gives the config and the job's identity, and training starts
again from scratch into the run's MLflow run (found by its `medexp.output_dir` tag), or into a new run if
none was created yet.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medexp.config.build import build_dataset, build_model
from medexp.config.untrusted import check_plain, load_config
from medexp.data.base import DatasetInfo
from medexp.errors import DataError
from medexp.run import checkpoint
from medexp.tracking.liveness import hold_run_folder, take_over
from medexp.tracking.runs import find_output_dir, run_of_output_dir
from medexp.tracking.store import resolve_uri
from medexp.tracking.sweep import PARENT_FILE

CHECKPOINTS = ("best", "last")
RECORD_FILE = "medexp_run.json"
NOT_RESULT_KEYS = ("sweep.", "hydra.", "hydra/", "trainer.progress")


@dataclass
class RestoredRun:
    """A run as its checkpoint holds it.

    Attributes:
        cfg: the run's resolved config, typed by the schema.
        state: the checkpoint (model, optimizer, scheduler, epoch, rng, run_id, info, ...); None for a run
            killed before its first checkpoint (resume then starts from scratch).
        output_dir: the run's output folder (checkpoints/ inside it).
        path: the checkpoint file read (None without a checkpoint).
        job: the killed job's identity (choices, overrides, parent run) when restored from its start record.
        started_run_id: the MLflow run such a job had created, if any.
    """

    cfg: DictConfig
    state: dict[str, Any] | None
    output_dir: Path
    path: Path | None
    job: dict[str, Any] = field(default_factory=dict)
    started_run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        """The MLflow run to continue: the checkpoint's, else the one the killed job had created (or None)."""
        return self.state.get("run_id") if self.state else self.started_run_id

    def dataset_info(self) -> DatasetInfo:
        """The dataset description stored with the weights (classes, channels, shape), else rebuilt."""
        if self.state and "info" in self.state:
            return DatasetInfo(**self.state["info"])
        return build_dataset(self.cfg).info

    def model(self, device: torch.device | str = "cpu", info: DatasetInfo | None = None) -> nn.Module:
        """The run's network with the checkpoint's weights, on `device`, in eval mode."""
        info = info or self.dataset_info()
        net = build_model(self.cfg, info.in_channels, info.num_classes, info.spatial_dims)
        load_weights(net, self.state["model"], self.path)
        return net.to(device).eval()


def load_weights(net: nn.Module, weights: dict[str, torch.Tensor], source: Path | str | None) -> None:
    """`net.load_state_dict(weights)`, with weights that do not fit the network (another architecture, a
    checkpoint whose config and weights disagree) refused in one line naming the file.

    Raises:
        DataError: missing or unexpected keys, or a tensor of another shape.
    """
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise DataError(
            f"{source}: its weights do not fit the network its config builds ({first[:300]})"
        ) from err


def result_overrides(task_overrides: list[str]) -> list[str]:
    """The overrides that define a job's result (its identity for sweep.skip_finished and the MLflow tag)."""
    return [o for o in task_overrides if not o.lstrip("+~").startswith(NOT_RESULT_KEYS)]


def checkpoint_path(source: str, which: str = "last", uri: str | None = None) -> Path:
    """The checkpoint file `which` ("best" or "last") of `source`: a checkpoint file, a run's output folder
    or an MLflow run id (looked up in the store `uri`).

    Raises:
        DataError: no such file, folder or run, or the run has no such checkpoint.
    """
    if which not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        file = path / "checkpoints" / f"{which}.pt"
        if not file.exists():
            raise DataError(f"{source}: no checkpoints/{which}.pt in that folder")
        return file
    file = Path(find_output_dir(source, uri)) / "checkpoints" / f"{which}.pt"
    if not file.exists():
        raise DataError(f"run {source}: MLflow run found, but its checkpoint {file} is missing")
    return file


def restore(
    source: str, which: str = "last", uri: str | None = None, device: torch.device | str = "cpu"
) -> RestoredRun:
    """Read the checkpoint `which` of `source` (see `checkpoint_path`) and check its config."""
    return _read(checkpoint_path(source, which, uri), device)


def _read(path: Path, device: torch.device | str = "cpu") -> RestoredRun:
    state = checkpoint.load(path, map_location=device)
    cfg = load_config(state["config"], path)  # refused before anything is resolved or built
    return RestoredRun(cfg=cfg, state=state, output_dir=path.parent.parent, path=path)


def write_record(output_dir: str | Path, config_yaml: str, job: dict[str, Any]) -> Path:
    """The job's start record: its config (YAML) and identity, so that a run killed before its first
    checkpoint can be resumed from its folder. Written atomically."""
    path = Path(output_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"config": config_yaml, "job": job}, indent=1, default=str))
    tmp.replace(path)
    return path


def _read_record(folder: Path) -> dict[str, Any] | None:
    """The start record of `folder`, else one made from Hydra's `.hydra/` files (a kill between Hydra
    creating the folder and the job's first line), else None."""
    record = folder / RECORD_FILE
    if record.exists():
        return {**json.loads(record.read_text()), "source": str(record)}
    hydra_dir = folder / ".hydra"
    if not (hydra_dir / "config.yaml").exists() or not (hydra_dir / "hydra.yaml").exists():
        return None
    hydra = OmegaConf.to_container(OmegaConf.load(hydra_dir / "hydra.yaml"), resolve=False)["hydra"]
    parent = folder.parent / PARENT_FILE
    multirun = str(hydra["mode"]) == "MULTIRUN" and parent.exists()
    job = {
        "choices": dict(hydra["runtime"]["choices"]),
        "overrides": result_overrides([str(o) for o in hydra["overrides"]["task"]]),
        "parent_run_id": json.loads(parent.read_text())["run_id"] if multirun else None,
    }
    check_plain(job, str(hydra_dir / "hydra.yaml"))  # read, never resolved: no `${` allowed
    config = hydra_dir / "config.yaml"
    return {"config": config.read_text(), "job": job, "source": str(config)}


def newest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint of `folder`/checkpoints with the highest epoch (last.pt on a tie), or None.

    last.pt is written first each epoch, so it is the newest; best.pt stands in where last.pt is missing
    or unreadable (a folder written by a medexp that saved best.pt first). A refused file (pickle payload)
    is an error, not skipped.
    """
    found, errors = [], []
    for name in ("last", "best"):
        file = folder / "checkpoints" / f"{name}.pt"
        if not file.exists():
            continue
        try:
            found.append((int(checkpoint.load(file, mmap=True)["epoch"]), name == "last", file))
        except checkpoint.RefusedCheckpoint:
            raise
        except DataError as err:
            errors.append(err)
    if not found and errors:
        raise errors[0]
    for err in errors:
        print(f"medexp train: warning: {err}; resuming from the other checkpoint", file=sys.stderr)
    return max(found)[2] if found else None


def restore_for_resume(source: str, uri: str | None = None) -> RestoredRun:
    """`resume=source` (a checkpoint file, an output folder or an MLflow run id): the run at its newest
    complete checkpoint, or, killed before the first one, its start record (state None).

    The process that will own the run (rank 0; every process without torchrun) first locks the run's
    folder for its lifetime (liveness.hold_run_folder: a second resume is refused while this one lives,
    from before its data preparation), then removes stale temp files, makes best.pt match a last.pt whose
    epoch was the best (a kill between the two writes), and checks that the run may be reopened and
    records itself as its owner (liveness.take_over).

    Raises:
        DataError: nothing to resume there, a refused checkpoint, another process owns the run, the run
            is FINISHED or is not in the store.
        ConfigError: the stored config has a `_target_` outside the allowlist.
    """
    path = Path(source)
    if path.is_file():
        restored = restore(source)
    else:
        folder = path if path.is_dir() else Path(find_output_dir(source, uri))
        newest = newest_checkpoint(folder)
        restored = _read(newest) if newest else _from_record(folder, source, uri)
    if int(os.environ.get("RANK", "0")) != 0:
        return restored
    hold_run_folder(restored.output_dir)
    checkpoint.remove_stale_temp(restored.output_dir / "checkpoints")
    _repair_best(restored)
    if restored.run_id:
        notice = take_over(resolve_uri(uri or restored.cfg.tracking_uri), restored.run_id)
        if notice:
            print(f"medexp train: note: {notice}", file=sys.stderr)
    return restored


def _from_record(folder: Path, source: str, uri: str | None) -> RestoredRun:
    """A run killed before its first checkpoint: its config and job from the start record, its MLflow run
    (if it had created one) from the store."""
    record = _read_record(folder)
    if record is None:
        raise DataError(f"{source}: nothing to resume: no checkpoint and no {RECORD_FILE} in {folder}")
    cfg = load_config(record["config"], record["source"], own_interpolations=True)  # may be unresolved
    if Path(source).exists():
        store = resolve_uri(uri or cfg.tracking_uri)
        run_id = run_of_output_dir(folder, cfg.experiment_name, store)
    else:
        run_id = source  # an MLflow run id
    return RestoredRun(cfg, None, folder, None, job=record.get("job") or {}, started_run_id=run_id)


def _repair_best(restored: RestoredRun) -> None:
    """If the epoch of last.pt was the best so far but best.pt is older (killed between the two writes),
    make best.pt that epoch's."""
    state = restored.state
    if not state or restored.path is None or restored.path.name != "last.pt":
        return
    if state.get("metrics", {}).get("val/dice_mean") != state["best"]:
        return
    best = restored.path.with_name("best.pt")
    try:
        if best.exists() and checkpoint.load(best, mmap=True)["best"] == state["best"]:
            return
    except DataError:
        pass  # unreadable: replaced below
    checkpoint.share_atomic(restored.path, best)
