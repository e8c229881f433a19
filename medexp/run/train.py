"""The training job: data, model, optimisation, validation, checkpoints, test evaluation, MLflow.

`run(cfg, output_dir)` is what one Hydra job calls. With trainer.devices=N > 1 it starts N worker
processes (DDP); under torchrun it is itself one worker. `train_worker` then reads top to bottom like a
script: data, tracking, model, epochs, test.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.utils import set_determinism
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from medexp.config.build import build_loss, build_model, build_optimizer, build_scheduler
from medexp.config.flat import flatten, to_yaml
from medexp.config.validate import validate
from medexp.errors import ConfigError
from medexp.evaluation.floor import TemplatePredictor, majority_template
from medexp.evaluation.inference import evaluate
from medexp.evaluation.summary import foreground_means, write_case_csv
from medexp.report.run_plots import log_run_plots
from medexp.run import checkpoint, dist, runtime
from medexp.run.data import JobData, class_frequencies, job_data
from medexp.run.progress import TrainProgress
from medexp.run.records import checkpoint_state, log_conv_impls, print_result, run_name, run_tags
from medexp.run.restore import RestoredRun, load_weights, restore, restore_for_resume
from medexp.run.steps import numerics, ranks_in_sync, train_epoch
from medexp.tracking.runs import RunTracker
from medexp.tracking.store import resolve_uri

RESULT_FILE = "result.yaml"
log = logging.getLogger(__name__)
RESUMABLE_KEYS = ("trainer.", "tracking_uri")  # what a resume may change: the budget and the hardware


def run(cfg: DictConfig, output_dir: str | Path, job: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns rank 0's result (run id, status, metrics)."""
    job = job or {}
    restored = None
    if cfg.resume:
        restored = restore_for_resume(cfg.resume, cfg.tracking_uri)
        cfg = resumed_config(restored, cfg, job.get("overrides", []))
        output_dir = restored.output_dir
        job = {**job, **restored.job}  # killed before its first checkpoint: the tags its own job had
    validate(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if dist.launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return train_worker(rank, world_size, cfg, output_dir, job, None, restored)
    if cfg.trainer.devices == 1:
        return train_worker(0, 1, cfg, output_dir, job, None, restored)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    resume_from = str(restored.path) if restored and restored.path else None
    started = restored.started_run_id if restored else None
    args = (cfg.trainer.devices, cfg_yaml, str(output_dir), job, dist.free_port(), resume_from, started)
    runtime.spawn_workers(_spawned_worker, args, cfg.trainer.devices)  # SIGTERM reaches the workers too
    return OmegaConf.to_container(OmegaConf.load(output_dir / RESULT_FILE))


def resumed_config(restored: RestoredRun, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's own config (from its checkpoint), with the command's trainer.* and tracking_uri overrides.

    The run's model, loss, data and learning rate are what it was started with; only the budget and
    hardware (e.g. trainer.max_epochs=400, trainer.devices=2) may change on resume. Any other override
    that differs from the run's own value is refused (one line naming it) rather than silently ignored.

    Raises:
        ConfigError: an override that a resume does not apply.
    """
    resumed = restored.cfg.copy()
    resumed.resume = cfg.resume
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(RESUMABLE_KEYS):
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=False)
        elif key != "resume" and _value(cfg, key) != _value(restored.cfg, key):
            raise ConfigError(
                f"resume: override {override} is not applied: a resumed run keeps its own config and only "
                "trainer.* and tracking_uri may change; drop it, or start a new run with it"
            )
    return resumed


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value of `key` (a group's whole node, e.g. kernel) as plain data, or None."""
    node = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _spawned_worker(rank, world_size, cfg_yaml, output_dir, job, port, resume_from, started=None) -> None:
    if rank == 0:  # a fresh process without Hydra's job logging: rank 0's epochs and result go to job.log too
        handler = logging.FileHandler(Path(output_dir) / "job.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger("medexp").addHandler(handler)
        logging.getLogger("medexp").setLevel(logging.INFO)
    cfg = OmegaConf.create(cfg_yaml)
    restored = restore(resume_from) if resume_from else None
    if started:  # resumed before its first checkpoint: from scratch into the run it had created
        restored = RestoredRun(
            cfg=cfg, state=None, output_dir=Path(output_dir), path=None, started_run_id=started
        )
    with runtime.stop_on_sigterm():
        train_worker(rank, world_size, cfg, Path(output_dir), job, port, restored)


def train_worker(
    rank: int,
    world_size: int,
    cfg: DictConfig,
    output_dir: Path,
    job: dict,
    port: int | None,
    restored: RestoredRun | None = None,
) -> dict[str, Any]:
    """One process of the job: set up its rank, train, and end its MLflow run whatever happens."""
    ctx = dist.setup(rank, world_size, cfg.trainer.accelerator, port)
    set_determinism(seed=cfg.seed + rank)  # torch, numpy, python and MONAI; augmentation differs per rank
    tracker = RunTracker(active=ctx.is_main)
    try:
        return _train(cfg, ctx, output_dir, job, tracker, restored)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException as err:
        if tracker.run_id and not tracker.ended:  # an ended (FINISHED) run keeps its status and tags
            tracker.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.finish("FAILED")
        raise
    finally:
        dist.cleanup()


@dataclass
class Training:
    """What the epochs work on: the model (and `net`, the DDP / compiled wrapper that trains), the loss,
    optimiser and schedule, the numerics, and where the run stands (the resumed epoch, best validation Dice
    and the metrics of the last checkpoint)."""

    model: torch.nn.Module
    net: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: Any
    epoch: int = 0
    best: float = -math.inf
    last_metrics: dict = field(default_factory=dict)


def _train(cfg, ctx: dist.DistContext, output_dir: Path, job: dict, tracker: RunTracker, restored) -> dict:
    """One job from its data to its record, nanoGPT-style: data, MLflow run, model, epochs, test."""
    data = job_data(cfg, ctx)
    uri = resolve_uri(cfg.tracking_uri)
    run_id = tracker.start(  # a new run, or the resumed run's own; from here on failures are recorded
        uri=uri,
        experiment=cfg.experiment_name,
        run_name=run_name(cfg, job),
        tags=run_tags(cfg, job, data.info, output_dir),
        parent_run_id=job.get("parent_run_id"),
        run_id=restored.run_id if restored else None,
        system_metrics=bool(cfg.tracking.get("system_metrics", False)),
    )
    run_id = dist.broadcast_object(run_id, ctx)
    log.info("run %s (%s), output folder %s", run_id, run_name(cfg, job), output_dir)
    training = _build(cfg, ctx, data, restored)
    _log_start(cfg, training, data, output_dir, tracker)
    started = time.perf_counter()
    diverged_at = _epochs(cfg, ctx, training, data, job, tracker, run_id, output_dir / "checkpoints")
    seconds = time.perf_counter() - started
    in_sync = ranks_in_sync(training.model, ctx)
    result: dict[str, Any] = {"run_id": run_id, "status": "diverged" if diverged_at else "finished"}
    if ctx.is_main:
        record = {"diverged_at": diverged_at, "train_seconds": seconds, "in_sync": in_sync, "uri": uri}
        _finish(cfg, ctx, training, data, output_dir, tracker, record, result)
    dist.barrier(ctx)
    return result


def _build(cfg, ctx: dist.DistContext, data: JobData, restored: RestoredRun | None) -> Training:
    """Model, loss, optimiser and schedule, restored from the checkpoint of a resumed run."""
    info = data.info
    model = build_model(cfg, info.in_channels, info.num_classes, info.spatial_dims).to(ctx.device)
    frequencies = class_frequencies(data.train_loader, info.num_classes)
    loss_fn = build_loss(cfg, frequencies, ignore_label=info.ignore_index is not None).to(ctx.device)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, cfg.trainer.max_epochs)
    fixed_shapes = bool(info.shape) and all(s > 0 for s in info.shape)  # every batch dataset.shape
    steps = numerics(
        cfg.trainer.precision, cfg.trainer.channels_last, info.spatial_dims, ctx.device, fixed_shapes
    )
    training = Training(model, model, loss_fn, optimizer, scheduler, steps)
    state = restored.state if restored else None
    if state:
        load_weights(model, state["model"], restored.path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        training.epoch, training.best, training.last_metrics = state["epoch"], state["best"], state["metrics"]
    training.model = model = model.to(memory_format=steps.memory_format)
    training.net = DistributedDataParallel(model) if ctx.distributed else model
    if cfg.trainer.compile:
        # Only the training step runs compiled; evaluation and checkpoints use `model` itself, so state
        # dicts keep their plain keys and resume works with or without compile.
        # MEDEXP_COMPILE_BACKEND picks another torch.compile backend (e.g. "eager" to check tracing only).
        training.net = torch.compile(
            training.net, backend=os.environ.get("MEDEXP_COMPILE_BACKEND", "inductor")
        )
    return training


def _log_start(cfg, training: Training, data: JobData, output_dir: Path, tracker: RunTracker) -> None:
    """A new run's params, config and dataset input; a resumed run's metrics of its last checkpoint if the
    kill came between the checkpoint and their logging. The tracker is inactive on ranks other than 0."""
    if training.epoch == 0:
        tracker.log_params(flatten(cfg))
        tracker.log_params({"model.num_parameters": sum(p.numel() for p in training.model.parameters())})
        if tracker.active:
            (output_dir / "config.yaml").write_text(to_yaml(cfg))
            tracker.log_artifact(output_dir / "config.yaml")
        tracker.log_dataset(data.parts, data.info)  # which cases, from which folder (no data copied)
    elif not tracker.has_step("train/loss", training.epoch):
        tracker.log_metrics(training.last_metrics, step=training.epoch)


def _epochs(
    cfg, ctx, training: Training, data: JobData, job: dict, tracker, run_id, ckpt_dir: Path
) -> int | None:
    """Train from the run's epoch to trainer.max_epochs: train, all-reduce the loss, validate and
    checkpoint on rank 0, then log. Returns the epoch whose loss was not finite (diverged), else None."""
    max_epochs = cfg.trainer.max_epochs
    show = ctx.is_main and cfg.trainer.progress
    with TrainProgress(show, max_epochs, len(data.train_loader), job.get("title", "train")) as bar:
        bar.skip_to(training.epoch)
        for epoch in range(training.epoch + 1, max_epochs + 1):
            data.train_loader.sampler.set_epoch(epoch)
            bar.start_epoch(epoch)
            loss = train_epoch(
                training.net, data.train_loader, training.loss_fn, training.optimizer, training.steps, ctx,
                bar, augment=data.device_augment,
            )  # fmt: skip
            loss = dist.all_reduce_mean(loss, ctx)
            if not math.isfinite(loss):
                tracker.log_metrics({"train/loss": loss}, step=epoch)
                return epoch
            training.scheduler.step()
            metrics = {"train/loss": loss, "train/lr": training.optimizer.param_groups[0]["lr"]}
            improved = False
            if ctx.is_main:
                improved = _validate_and_save(cfg, ctx, training, data, epoch, metrics, run_id, ckpt_dir)
            tracker.log_metrics(metrics, step=epoch)
            bar.end_epoch(epoch, _shown(metrics), improved)
            dist.barrier(ctx)
    return None


def _shown(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in ("train/loss", "val/dice_mean")}


def _validate_and_save(
    cfg, ctx, training: Training, data: JobData, epoch: int, metrics: dict, run_id, ckpt_dir: Path
) -> bool:
    """Rank 0's end of an epoch: validate (per volume, also for slice models), write last.pt and, when
    validation Dice improved, best.pt; adds the val/* metrics to `metrics` and says whether it improved."""
    info = data.info
    improved = False
    if epoch % cfg.trainer.val_every == 0 or epoch == cfg.trainer.max_epochs:
        val = evaluate(
            training.model, data.val_loader, num_classes=info.num_classes, roi_size=info.shape,
            device=ctx.device, ignore_label=info.ignore_index,
        )  # fmt: skip
        metrics.update(foreground_means(val.values, info.label_names, "val"))
        score = metrics["val/dice_mean"]  # NaN only when no label is defined in any val case
        improved = math.isfinite(score) and score > training.best
        training.best = score if improved else training.best
    state = checkpoint_state(
        training.model, training.optimizer, training.scheduler, epoch=epoch, best=training.best, cfg=cfg,
        run_id=run_id, metrics=metrics, info=info,
    )  # fmt: skip
    # last.pt (the resume point) first, then best.pt as the same file: a kill at any instant leaves a
    # complete last.pt, and resume repairs a best.pt it did not reach (docs/design.md §9)
    checkpoint.save_atomic(state, ckpt_dir / "last.pt")
    if improved:
        checkpoint.share_atomic(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
    log.info(  # job.log (Hydra's job logging)
        "epoch %d/%d %s%s",
        epoch,
        cfg.trainer.max_epochs,
        _fmt(_shown(metrics)),
        " (best)" if improved else "",
    )
    return improved


def _finish(
    cfg, ctx, training: Training, data: JobData, output_dir: Path, tracker, record: dict, result: dict
):
    """Rank 0 after the epochs: test the best checkpoint, the floor, the MLflow model, plots and tags; the
    run FINISHED, and the job's `result` (run id, status) completed and written to result.yaml."""
    model, info, diverged_at = training.model, data.info, record["diverged_at"]
    result.update(_test(cfg, model, data, ctx, output_dir / "checkpoints", output_dir, tracker))
    result.update(_floor(cfg, data, tracker))
    if "test" in result and cfg.tracking.get("log_model", True):
        # the best checkpoint's weights (loaded by _test) as the run's MLflow model, no optimiser state
        result["model_uri"] = tracker.log_model(model, cfg, info, cfg.tracking.get("register_as"))
    if math.isfinite(training.best):
        result["best_val_dice"] = training.best  # the objective of sweepers that optimise (run/job.py)
    if cfg.tracking.log_plots:  # learning curves, Fig. 4-style overlays, learned Gabor kernels
        log_run_plots(
            tracker, model, data.parts["test"], info, output_dir, uri=record["uri"], device=ctx.device,
            predictions="test" in result,
        )  # fmt: skip
    log_conv_impls(model, output_dir, tracker)
    seconds = record["train_seconds"]
    tags = {"diverged": str(diverged_at is not None).lower(), "train_seconds": f"{seconds:.1f}"}
    tags.update(ranks_in_sync=str(record["in_sync"]).lower(), world_size=ctx.world_size)
    tracker.set_tags({**tags, **({"diverged_epoch": diverged_at} if diverged_at else {})})
    tracker.finish("FINISHED")
    result.update(epoch=diverged_at or cfg.trainer.max_epochs, train_seconds=round(seconds, 1))
    result["output_dir"] = str(output_dir)
    (output_dir / RESULT_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(result)))
    print_result(result, record["uri"], output_dir)
    means = {k: v for k, v in result.get("test", {}).items() if k.endswith("_mean")}
    log.info("%s after %s epoch(s): %s", result["status"], result["epoch"], _fmt(means))


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _floor(cfg, data: JobData, tracker) -> dict[str, Any]:
    """The no-learning floor on the test split (medexp.evaluation.floor): the training cases' per-voxel
    majority label scored as a prediction, logged as floor/* metrics next to the model's test/*."""
    info = data.info
    if not data.parts.get("test"):
        return {}
    try:
        template = majority_template((b["label"] for b in data.loader("train")), info.num_classes)
    except ValueError as err:  # cases of different shapes: no common grid, no template
        log.info("no no-learning floor: %s", err)
        return {}
    table = evaluate(
        TemplatePredictor(template, info.num_classes), data.loader("test"), num_classes=info.num_classes,
        roi_size=info.shape, device=torch.device("cpu"), metrics=["dice"], ignore_label=info.ignore_index,
    )  # fmt: skip
    metrics = foreground_means(table.values, info.label_names, "floor")
    if not tracker.has_step("floor/dice_mean", cfg.trainer.max_epochs):  # resumed after it was logged
        tracker.log_metrics(metrics, step=cfg.trainer.max_epochs)
    return {"floor": metrics}


def _test(cfg, model, data: JobData, ctx, ckpt_dir: Path, output_dir: Path, tracker) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test split: metrics to MLflow, per-case CSV as an artifact."""
    best_path = ckpt_dir / "best.pt"
    if not best_path.exists():
        return {}
    info = data.info
    model.load_state_dict(checkpoint.load(best_path, map_location=ctx.device)["model"])
    table = evaluate(
        model,
        data.loader("test"),
        num_classes=info.num_classes,
        roi_size=info.shape,
        device=ctx.device,
        metrics=list(cfg.eval.metrics),
        distance=cfg.eval.get("distance", "medexp"),  # configs logged before the key: the default
        spacing=info.spacing,
        ignore_label=info.ignore_index,
    )
    metrics = foreground_means(table.values, info.label_names, "test")
    if not tracker.has_step(next(iter(metrics)), cfg.trainer.max_epochs):  # resumed after they were logged
        tracker.log_metrics(metrics, step=cfg.trainer.max_epochs)
    csv_path = output_dir / "test_metrics.csv"
    tracker.log_artifact(write_case_csv(csv_path, table.ids, table.values, info.label_names, table.voxels))
    if cfg.tracking.log_checkpoint:
        tracker.log_artifact(best_path, "checkpoints")
    return {"test": metrics}
