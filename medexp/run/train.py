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
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from monai.utils import set_determinism
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from medexp.config.build import build_loss, build_model, build_optimizer, build_scheduler
from medexp.config.flat import flatten, to_yaml
from medexp.config.validate import validate
from medexp.evaluation.floor import TemplatePredictor, majority_template
from medexp.evaluation.inference import evaluate
from medexp.evaluation.summary import foreground_means, write_case_csv
from medexp.report.run_plots import log_run_plots
from medexp.run import checkpoint, dist
from medexp.run.data import JobData, class_frequencies, job_data
from medexp.run.progress import TrainProgress
from medexp.run.records import checkpoint_state, log_conv_impls, print_result, run_name, run_tags
from medexp.run.restore import RestoredRun, restore, restore_for_resume
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
    mp.spawn(_spawned_worker, args=args, nprocs=cfg.trainer.devices)
    return OmegaConf.to_container(OmegaConf.load(output_dir / RESULT_FILE))


def resumed_config(restored: RestoredRun, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's own config (from its checkpoint), with the command's trainer.* and tracking_uri overrides.

    The run's model, loss, data and learning rate are what it was started with; only the budget and
    hardware (e.g. trainer.max_epochs=400, trainer.devices=2) may change on resume.
    """
    resumed = restored.cfg.copy()
    resumed.resume = cfg.resume
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(RESUMABLE_KEYS):
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=False)
    return resumed


def _spawned_worker(rank, world_size, cfg_yaml, output_dir, job, port, resume_from, started=None) -> None:
    if rank == 0:  # a fresh process without Hydra's job logging: rank 0's epochs and result go to job.log too
        handler = logging.FileHandler(Path(output_dir) / "job.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger("medexp").addHandler(handler)
        logging.getLogger("medexp").setLevel(logging.INFO)
    cfg = OmegaConf.create(cfg_yaml)
    restored = restore(resume_from) if resume_from else None
    if started:  # resumed before its first checkpoint: from scratch into the run it had created
        restored = RestoredRun(cfg, None, Path(output_dir), None, started_run_id=started)
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
        if tracker.run_id:
            tracker.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.finish("FAILED")
        raise
    finally:
        dist.cleanup()


def _train(cfg, ctx: dist.DistContext, output_dir: Path, job: dict, tracker: RunTracker, restored) -> dict:
    data = job_data(cfg, ctx)
    info = data.info

    # --- the MLflow run: a new one, or the resumed run's own; from here on failures are recorded
    state = restored.state if restored else None
    ckpt_dir = output_dir / "checkpoints"
    uri = resolve_uri(cfg.tracking_uri)
    run_id = tracker.start(
        uri=uri,
        experiment=cfg.experiment_name,
        run_name=run_name(cfg, job),
        tags=run_tags(cfg, job, info, output_dir),
        parent_run_id=job.get("parent_run_id"),
        run_id=restored.run_id if restored else None,
        system_metrics=bool(cfg.tracking.get("system_metrics", False)),
    )
    run_id = dist.broadcast_object(run_id, ctx)
    log.info("run %s (%s), output folder %s", run_id, run_name(cfg, job), output_dir)

    # --- model, loss, optimiser, scheduler
    model = build_model(cfg, info.in_channels, info.num_classes, info.spatial_dims).to(ctx.device)
    frequencies = class_frequencies(data.train_loader, info.num_classes)
    loss_fn = build_loss(cfg, frequencies, ignore_label=info.ignore_index is not None).to(ctx.device)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, cfg.trainer.max_epochs)
    start_epoch, best, last_metrics = 0, -math.inf, {}
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start_epoch, best, last_metrics = state["epoch"], state["best"], state["metrics"]
    fixed_shapes = bool(info.shape) and all(s > 0 for s in info.shape)  # every batch dataset.shape
    steps = numerics(
        cfg.trainer.precision, cfg.trainer.channels_last, info.spatial_dims, ctx.device, fixed_shapes
    )
    model = model.to(memory_format=steps.memory_format)
    net = DistributedDataParallel(model) if ctx.distributed else model
    if cfg.trainer.compile:
        # Only the training step runs compiled; evaluation and checkpoints use `model` itself, so state
        # dicts keep their plain keys and resume works with or without compile.
        # MEDEXP_COMPILE_BACKEND picks another torch.compile backend (e.g. "eager" to check tracing only).
        net = torch.compile(net, backend=os.environ.get("MEDEXP_COMPILE_BACKEND", "inductor"))
    if ctx.is_main and start_epoch == 0:
        tracker.log_params(flatten(cfg))
        tracker.log_params({"model.num_parameters": sum(p.numel() for p in model.parameters())})
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
        tracker.log_artifact(output_dir / "config.yaml")
        tracker.log_dataset(data.parts, info)  # which cases, from which folder (no data copied)
    if start_epoch and not tracker.has_step("train/loss", start_epoch):
        tracker.log_metrics(last_metrics, step=start_epoch)  # killed between checkpoint and logging

    # --- epochs: train, all-reduce the loss, validate on rank 0, checkpoint, then log
    max_epochs = cfg.trainer.max_epochs
    diverged_at = None
    started = time.perf_counter()
    title = job.get("title", "train")
    with TrainProgress(
        ctx.is_main and cfg.trainer.progress, max_epochs, len(data.train_loader), title
    ) as bar:
        bar.skip_to(start_epoch)
        for epoch in range(start_epoch + 1, max_epochs + 1):
            data.train_loader.sampler.set_epoch(epoch)
            bar.start_epoch(epoch)
            train_loss = train_epoch(
                net, data.train_loader, loss_fn, optimizer, steps, ctx, bar, augment=data.device_augment
            )
            train_loss = dist.all_reduce_mean(train_loss, ctx)
            if not math.isfinite(train_loss):
                diverged_at = epoch
                tracker.log_metrics({"train/loss": train_loss}, step=epoch)
                break
            scheduler.step()
            metrics = {"train/loss": train_loss, "train/lr": optimizer.param_groups[0]["lr"]}
            improved = False
            if ctx.is_main and (epoch % cfg.trainer.val_every == 0 or epoch == max_epochs):
                val = evaluate(  # per volume, also for slice models (stacked back)
                    model, data.val_loader, num_classes=info.num_classes, roi_size=info.shape,
                    device=ctx.device, ignore_label=info.ignore_index,
                )  # fmt: skip
                metrics.update(foreground_means(val.values, info.label_names, "val"))
                score = metrics["val/dice_mean"]  # NaN only when no label is defined in any val case
                improved = math.isfinite(score) and score > best
                best = max(best, score) if improved else best
            if ctx.is_main:
                state = checkpoint_state(
                    model, optimizer, scheduler, epoch=epoch, best=best, cfg=cfg, run_id=run_id,
                    metrics=metrics, info=info,
                )  # fmt: skip
                # last.pt (the resume point) first, then best.pt as the same file: a kill at any instant
                # leaves a complete last.pt, and resume repairs a best.pt it did not reach (§9)
                checkpoint.save_atomic(state, ckpt_dir / "last.pt")
                if improved:
                    checkpoint.share_atomic(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
            tracker.log_metrics(metrics, step=epoch)
            shown = {k: v for k, v in metrics.items() if k in ("train/loss", "val/dice_mean")}
            bar.end_epoch(epoch, shown, improved)
            if ctx.is_main:  # job.log (Hydra's job logging)
                log.info("epoch %d/%d %s%s", epoch, max_epochs, _fmt(shown), " (best)" if improved else "")
            dist.barrier(ctx)
    train_seconds = time.perf_counter() - started
    in_sync = ranks_in_sync(model, ctx)

    # --- test evaluation of the best checkpoint, plots and the run's record (rank 0)
    result: dict[str, Any] = {"run_id": run_id, "status": "diverged" if diverged_at else "finished"}
    if ctx.is_main:
        result.update(_test(cfg, model, data, ctx, ckpt_dir, output_dir, tracker))
        result.update(_floor(cfg, data, tracker))
        if "test" in result and cfg.tracking.get("log_model", True):
            # the best checkpoint's weights (loaded by _test) as the run's MLflow model, no optimiser state
            result["model_uri"] = tracker.log_model(model, cfg, info, cfg.tracking.get("register_as"))
        if math.isfinite(best):
            result["best_val_dice"] = best  # the objective of sweepers that optimise (run/job.py)
        if cfg.tracking.log_plots:  # learning curves, Fig. 4-style overlays, learned Gabor kernels
            log_run_plots(
                tracker, model, data.parts["test"], info, output_dir, uri=uri, device=ctx.device,
                predictions="test" in result,
            )  # fmt: skip
        log_conv_impls(model, output_dir, tracker)
        tags = {"diverged": str(diverged_at is not None).lower(), "train_seconds": f"{train_seconds:.1f}"}
        tags.update(ranks_in_sync=str(in_sync).lower(), world_size=ctx.world_size)
        tracker.set_tags({**tags, **({"diverged_epoch": diverged_at} if diverged_at else {})})
        tracker.finish("FINISHED")
        result.update(
            epoch=diverged_at or max_epochs, train_seconds=round(train_seconds, 1), output_dir=str(output_dir)
        )
        (output_dir / RESULT_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(result)))
        print_result(result, uri, output_dir)
        means = {k: v for k, v in result.get("test", {}).items() if k.endswith("_mean")}
        log.info("%s after %s epoch(s): %s", result["status"], result["epoch"], _fmt(means))
    dist.barrier(ctx)
    return result


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
