"""The training job: data, model, optimisation, validation, checkpoints, test evaluation, MLflow.

`run(cfg, output_dir)` is what one Hydra job calls. With trainer.devices=N > 1 it starts N worker
processes (DDP); under torchrun it is itself one worker. `train_worker` reads top to bottom like a script.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from monai.utils import set_determinism
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from medexp import build, checkpoint, dist, plots
from medexp.config import TrainConfig, flatten, to_yaml, validate
from medexp.data.base import DataError
from medexp.data.loaders import make_loader
from medexp.data.splits import load_or_make_splits, select
from medexp.data.transforms import paper_augmentation
from medexp.evaluation import evaluate, foreground_means, write_case_csv
from medexp.progress import TrainProgress, print_summary
from medexp.tracking import RunTracker, resolve_uri

RESULT_FILE = "result.yaml"


def run(cfg: DictConfig, output_dir: str | Path, job: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns rank 0's result (run id, status, metrics)."""
    if cfg.resume:
        cfg = resumed_config(cfg, job.get("overrides", []) if job else [])
    validate(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    job = job or {}
    world_size = cfg.trainer.devices
    if dist.launched_by_torchrun():
        return train_worker(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), cfg, output_dir, job, None
        )
    if world_size == 1:
        return train_worker(0, 1, cfg, output_dir, job, None)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    mp.spawn(
        _spawned_worker,
        args=(world_size, cfg_yaml, str(output_dir), job, dist.free_port()),
        nprocs=world_size,
    )
    return OmegaConf.to_container(OmegaConf.load(output_dir / RESULT_FILE))


def _spawned_worker(rank: int, world_size: int, cfg_yaml: str, output_dir: str, job: dict, port: int) -> None:
    train_worker(rank, world_size, OmegaConf.create(cfg_yaml), Path(output_dir), job, port)


def train_worker(
    rank: int, world_size: int, cfg: DictConfig, output_dir: Path, job: dict, port: int | None
) -> dict[str, Any]:
    ctx = dist.setup(rank, world_size, cfg.trainer.accelerator, port)
    set_determinism(seed=cfg.seed + rank)  # torch, numpy, python and MONAI; augmentation differs per rank
    tracker = RunTracker(active=ctx.is_main)
    try:
        return _train(cfg, ctx, output_dir, job, tracker)
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


def _train(cfg: DictConfig, ctx: dist.DistContext, output_dir: Path, job: dict, tracker: RunTracker) -> dict:
    info, parts, train_loader, val_loader, loader_args = _data(cfg, ctx)

    # --- resume (same output dir, same MLflow run) or start a new run; from here on failures are recorded
    state = None
    if cfg.resume:
        output_dir, state = _resume_state(cfg.resume, ctx.device)
    ckpt_dir = output_dir / "checkpoints"
    uri = resolve_uri(cfg.tracking_uri)
    run_id = tracker.start(
        uri=uri,
        experiment=cfg.experiment_name,
        run_name=job.get("name") or f"{cfg.kernel.kind}-{_choice(job, 'loss')}-lr{cfg.lr:g}-split{cfg.split}",
        tags=_tags(cfg, job, info, output_dir),
        parent_run_id=job.get("parent_run_id"),
        run_id=state["run_id"] if state else None,
    )
    run_id = dist.broadcast_object(run_id, ctx)

    # --- model, loss, optimiser, scheduler
    model = build.build_model(cfg, info.in_channels, info.num_classes, info.spatial_dims).to(ctx.device)
    loss_fn = build.build_loss(cfg, _class_frequencies(train_loader, info.num_classes)).to(ctx.device)
    optimizer = build.build_optimizer(cfg, model.parameters())
    scheduler = build.build_scheduler(cfg, optimizer, cfg.trainer.max_epochs)
    start_epoch, best, last_metrics = 0, -math.inf, {}
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start_epoch, best, last_metrics = state["epoch"], state["best"], state["metrics"]
    memory_format = _memory_format(cfg.trainer.channels_last, info.spatial_dims)
    model = model.to(memory_format=memory_format)
    net = DistributedDataParallel(model) if ctx.distributed else model
    if cfg.trainer.compile:
        # Only the training step runs compiled; evaluation and checkpoints use `model` itself, so state
        # dicts keep their plain keys and resume works with or without compile.
        # MEDEXP_COMPILE_BACKEND picks another torch.compile backend (e.g. "eager" to check tracing only).
        net = torch.compile(net, backend=os.environ.get("MEDEXP_COMPILE_BACKEND", "inductor"))
    autocast, scaler = _mixed_precision(cfg.trainer.precision, ctx.device)
    if ctx.is_main and start_epoch == 0:
        tracker.log_params(flatten(cfg))
        tracker.log_params({"model.num_parameters": sum(p.numel() for p in model.parameters())})
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
        tracker.log_artifact(output_dir / "config.yaml")
    if start_epoch and not tracker.has_step("train/loss", start_epoch):
        tracker.log_metrics(last_metrics, step=start_epoch)  # killed between checkpoint and logging

    # --- epochs: train, all-reduce the loss, validate on rank 0, checkpoint, then log
    max_epochs = cfg.trainer.max_epochs
    diverged_at = None
    started = time.perf_counter()
    title = job.get("title", "train")
    with TrainProgress(ctx.is_main and cfg.trainer.progress, max_epochs, len(train_loader), title) as bar:
        bar.skip_to(start_epoch)
        for epoch in range(start_epoch + 1, max_epochs + 1):
            train_loader.sampler.set_epoch(epoch)
            bar.start_epoch(epoch)
            train_loss = _train_epoch(
                net, train_loader, loss_fn, optimizer, (autocast, scaler, memory_format), ctx, bar
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
                _, val = evaluate(
                    model, val_loader, num_classes=info.num_classes, roi_size=info.shape, device=ctx.device
                )
                metrics.update(foreground_means(val, info.label_names, "val"))
                improved = metrics["val/dice_mean"] > best
                best = max(best, metrics["val/dice_mean"])
            if ctx.is_main:
                state = _state(model, optimizer, scheduler, epoch, best, cfg, run_id, metrics)
                state["info"] = dataclasses.asdict(info)  # classes, channels, shape: enough to predict
                if improved:
                    checkpoint.save_atomic(state, ckpt_dir / "best.pt")
                checkpoint.save_atomic(state, ckpt_dir / "last.pt")
            tracker.log_metrics(metrics, step=epoch)
            bar.end_epoch(
                epoch, {k: v for k, v in metrics.items() if k in ("train/loss", "val/dice_mean")}, improved
            )
            dist.barrier(ctx)
    train_seconds = time.perf_counter() - started
    in_sync = _ranks_in_sync(model, ctx)

    # --- test evaluation of the best checkpoint (rank 0)
    result: dict[str, Any] = {"run_id": run_id, "status": "diverged" if diverged_at else "finished"}
    if ctx.is_main:
        result.update(_test(cfg, model, parts["test"], info, ctx, ckpt_dir, output_dir, tracker, loader_args))
        if cfg.tracking.get(
            "log_plots", True
        ):  # learning curves, Fig. 4-style overlays, learned Gabor kernels
            plots.log_run_plots(
                tracker,
                model,
                parts["test"],
                info,
                output_dir,
                uri=uri,
                device=ctx.device,
                predictions="test" in result,
            )
        _log_conv_impls(model, output_dir, tracker)
        tags = {"diverged": str(diverged_at is not None).lower(), "train_seconds": f"{train_seconds:.1f}"}
        tags.update(ranks_in_sync=str(in_sync).lower(), world_size=ctx.world_size)
        tracker.set_tags({**tags, **({"diverged_epoch": diverged_at} if diverged_at else {})})
        tracker.finish("FINISHED")
        result.update(
            epoch=diverged_at or max_epochs, train_seconds=round(train_seconds, 1), output_dir=str(output_dir)
        )
        (output_dir / RESULT_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(result)))
        _print_result(result, uri, output_dir)
    dist.barrier(ctx)
    return result


def _data(cfg: DictConfig, ctx: dist.DistContext):
    """Dataset, split and loaders. Rank 0 prepares (generates / caches) first; the others then read it."""
    dataset = build.build_dataset(cfg)
    if not ctx.is_main:
        dist.barrier(ctx)
    cases = dataset.prepare()
    info = dataset.info
    splits = load_or_make_splits(info.root, [c["id"] for c in cases], cfg.n_splits)
    if ctx.is_main:
        dist.barrier(ctx)
    parts = select(cases, splits, cfg.split)
    augmentation = paper_augmentation(info.spatial_dims, **_augment_args(cfg), shape=info.shape)
    loader_args = dict(
        num_workers=cfg.trainer.num_workers, world_size=ctx.world_size, rank=ctx.rank, seed=cfg.seed
    )
    train_loader = make_loader(
        parts["train"],
        batch_size=cfg.trainer.batch_size,
        train=True,
        augmentation=augmentation,
        **loader_args,
    )
    val_loader = make_loader(parts["val"], batch_size=1, train=False, **loader_args) if ctx.is_main else None
    return info, parts, train_loader, val_loader, loader_args


def _ranks_in_sync(model, ctx: dist.DistContext) -> bool:
    """True when every rank ends with the same weights (a checksum compared across ranks)."""
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    if not ctx.distributed:
        return True
    sums = [None] * ctx.world_size
    torch.distributed.all_gather_object(sums, checksum)
    return all(s == sums[0] for s in sums)


def _train_epoch(net, loader, loss_fn, optimizer, numerics, ctx, bar) -> float:
    """One pass over the training loader; the mean loss, or NaN as soon as a step's loss is not finite."""
    autocast, scaler, memory_format = numerics
    net.train()
    total, count = 0.0, 0
    for batch in loader:
        # Plain tensors: MONAI's MetaTensor tracks metadata through every op of the network (measured 10%
        # of a 32^3 training step) and stops torch.compile from tracing it.
        image = batch["image"].as_subclass(torch.Tensor)
        image = image.to(ctx.device, non_blocking=True, memory_format=memory_format)  # (B, C, *spatial)
        label = batch["label"].as_subclass(torch.Tensor).to(ctx.device, non_blocking=True)  # (B, 1, *spatial)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(net(image), label)
        if not torch.isfinite(loss):
            return math.nan
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item()
        count += 1
        bar.step(loss.item())
    return total / max(count, 1)


def _test(cfg, model, cases, info, ctx, ckpt_dir, output_dir, tracker, loader_args) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test split: metrics to MLflow, per-case CSV as an artifact."""
    best_path = ckpt_dir / "best.pt"
    if not best_path.exists():
        return {}
    model.load_state_dict(checkpoint.load(best_path, map_location=ctx.device)["model"])
    loader = make_loader(cases, batch_size=1, train=False, **{**loader_args, "world_size": 1})
    ids, values = evaluate(
        model,
        loader,
        num_classes=info.num_classes,
        roi_size=info.shape,
        device=ctx.device,
        metrics=list(cfg.eval.metrics),
        spacing=info.spacing,
    )
    metrics = foreground_means(values, info.label_names, "test")
    tracker.log_metrics(metrics, step=cfg.trainer.max_epochs)
    csv_path = write_case_csv(output_dir / "test_metrics.csv", ids, values, info.label_names)
    tracker.log_artifact(csv_path)
    if cfg.tracking.log_checkpoint:
        tracker.log_artifact(best_path, "checkpoints")
    return {"test": metrics}


def _log_conv_impls(model: torch.nn.Module, output_dir: Path, tracker: RunTracker) -> None:
    """Record the convolution implementation every Gabor layer ran (conv_impls.json and a `conv_impls` tag).

    kernel.impl=auto picks by measured speed, so two runs of one config may pick differently and then differ
    in float rounding; the record says what ran, and a fixed kernel.impl repeats runs exactly.
    """
    used = {name: m.used_impl for name, m in model.named_modules() if getattr(m, "used_impl", None)}
    if not used:
        return
    path = output_dir / "conv_impls.json"
    path.write_text(json.dumps(used, indent=1))
    tracker.log_artifact(path)
    counts = collections.Counter(used.values())
    tracker.set_tags({"conv_impls": ",".join(f"{impl}:{n}" for impl, n in sorted(counts.items()))})


def _state(
    model, optimizer, scheduler, epoch: int, best: float, cfg: DictConfig, run_id, metrics: dict
) -> dict:
    return {
        "metrics": metrics,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best": best,
        "rng": checkpoint.rng_state(),
        "config": to_yaml(cfg),
        "run_id": run_id,
    }


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config stored in the checkpoint to resume, with the command's trainer.* and tracking_uri overrides.

    The run's model, loss, data and learning rate are what it was started with; only the budget and
    hardware (e.g. trainer.max_epochs=400, trainer.devices=2) may change on resume. The stored config is
    data from elsewhere: its `_target_`s are only instantiated from build.ALLOWED_PREFIXES.
    """
    _, state = _resume_state(cfg.resume, torch.device("cpu"))
    resumed = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(state["config"]))
    resumed.resume = cfg.resume
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("trainer.") or key == "tracking_uri":
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=False)
    return resumed


def _resume_state(resume: str, device: torch.device) -> tuple[Path, dict]:
    """(output dir, last checkpoint) of the run to resume: an output dir, checkpoint file or MLflow run id."""
    path = Path(resume)
    if path.is_file():
        file = path
    elif (path / "checkpoints" / "last.pt").exists():
        file = path / "checkpoints" / "last.pt"
    elif path.exists():
        raise DataError(f"resume={resume}: no checkpoints/last.pt in that folder")
    else:
        from medexp.tracking import find_output_dir

        file = Path(find_output_dir(resume)) / "checkpoints" / "last.pt"
        if not file.exists():
            raise DataError(f"resume={resume}: MLflow run found, but its checkpoint {file} is missing")
    return file.parent.parent, checkpoint.load(file, map_location=device)


def _class_frequencies(loader, num_classes: int) -> list[float] | None:
    """Fraction of voxels of each class over the (un-augmented, cached) training cases."""
    counts = np.zeros(num_classes)
    for item in loader.dataset._cache:
        counts += np.bincount(np.asarray(item["label"]).ravel().astype(np.int64), minlength=num_classes)[
            :num_classes
        ]
    return (counts / max(counts.sum(), 1)).tolist()


def _memory_format(channels_last: bool, spatial_dims: int) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _mixed_precision(precision: str, device: torch.device):
    """(autocast context factory, grad scaler) for trainer.precision; autocast only on CUDA."""
    use = precision != "32" and device.type == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use and precision == "fp16")
    if not use:
        return contextlib.nullcontext, scaler
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _augment_args(cfg: DictConfig) -> dict:
    a = cfg.augment
    prob = a.prob if a.enabled else 0.0
    return dict(prob=prob, rotate_deg=a.rotate_deg, shift=a.shift, scale=a.scale)


def _choice(job: dict, group: str) -> str:
    return job.get("choices", {}).get(group, "?")


def _tags(cfg: DictConfig, job: dict, info, output_dir: Path) -> dict[str, str]:
    choices = job.get("choices", {})
    tags = {g: str(choices.get(g, "?")) for g in ("loss", "head", "model", "dataset", "optim", "sched")}
    tags.update(
        kernel=str(cfg.kernel.kind),
        lr=f"{cfg.lr:g}",
        split=str(cfg.split),
        seed=str(cfg.seed),
        overrides=" ".join(job.get("overrides", [])),
        sweep_id=str(job.get("parent_run_id") or ""),
        num_classes=str(info.num_classes),
        label_names=",".join(info.label_names),
    )
    tags["medexp.output_dir"] = str(output_dir.resolve())
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        tags["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags


def _print_result(result: dict, uri: str, output_dir: Path) -> None:
    test = result.get("test", {})
    rows = [("MLflow run", str(result["run_id"])), ("tracking uri", uri), ("status", result["status"])]
    rows += [("epochs", str(result["epoch"])), ("train time", f"{result['train_seconds']:.1f} s")]
    rows += [(k, f"{v:.4f}") for k, v in test.items() if k.endswith("_mean") or k.startswith("test/dice/")]
    rows.append(("output dir", str(output_dir)))
    print_summary(rows)
