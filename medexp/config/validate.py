"""Value checks of a composed config, before anything is built: one-line `ConfigError`s.

Hydra and the schema already refuse unknown keys, unknown choices and values of the wrong type; this adds
the ranges. Each message names the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig

from medexp.errors import ConfigError
from medexp.evaluation.names import DISTANCE_DEFINITIONS, SUPPORTED  # names only: no torch, no MONAI
from medexp.nn.impls import IMPLS

ACCELERATORS = ("auto", "cpu", "cuda")
PRECISIONS = ("32", "bf16", "fp16")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: expected {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Check the value ranges of a composed config.

    Raises:
        ConfigError: naming the first offending key, its value and what is allowed.
    """
    lr = cfg.lr
    _check(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "lr", lr, "a positive number")
    _check(cfg.n_splits >= 1, "n_splits", cfg.n_splits, "an integer >= 1")
    _check(0 <= cfg.split < cfg.n_splits, "split", cfg.split, f"an integer in 0..{cfg.n_splits - 1}")
    ratios = list(cfg.split_ratios)
    _check(
        len(ratios) == 3 and all(r > 0 for r in ratios) and math.isclose(sum(ratios), 1.0, abs_tol=1e-6),
        "split_ratios",
        ratios,
        "three positive fractions (train, validation, test) that sum to 1",
    )
    t = cfg.trainer
    for key in ("max_epochs", "devices", "batch_size", "val_every"):
        _check(t[key] >= 1, f"trainer.{key}", t[key], "an integer >= 1")
    workers = t.num_workers
    ok = workers == "auto" or (_is_int(workers) and workers >= 0)
    _check(ok, "trainer.num_workers", workers, "auto or an integer >= 0")
    _check(t.prefetch_factor >= 1, "trainer.prefetch_factor", t.prefetch_factor, "an integer >= 1")
    _check(
        t.accelerator in ACCELERATORS,
        "trainer.accelerator",
        t.accelerator,
        f"one of {', '.join(ACCELERATORS)}",
    )
    _check(t.precision in PRECISIONS, "trainer.precision", t.precision, f"one of {', '.join(PRECISIONS)}")
    _check(cfg.sweep.gpus_per_job >= 0, "sweep.gpus_per_job", cfg.sweep.gpus_per_job, "an integer >= 0")
    _validate_dataset(cfg.dataset)
    _validate_kernel(cfg.kernel)
    for name in cfg.eval.metrics:
        _check(name in SUPPORTED, "eval.metrics", name, f"names from {', '.join(SUPPORTED)}")
    distance, definitions = cfg.eval.distance, ", ".join(DISTANCE_DEFINITIONS)
    _check(distance in DISTANCE_DEFINITIONS, "eval.distance", distance, f"one of {definitions}")


def _validate_dataset(dataset: DictConfig) -> None:
    dims = dataset.get("spatial_dims", 3)
    _check(dims in (2, 3), "dataset.spatial_dims", dims, "2 or 3")
    if "num_classes" in dataset:
        _check(dataset.num_classes >= 2, "dataset.num_classes", dataset.num_classes, "an integer >= 2")
    if "num_cases" in dataset:
        _check(
            dataset.num_cases >= 3, "dataset.num_cases", dataset.num_cases, "an integer >= 3 (train/val/test)"
        )
    shape = dataset.get("shape")
    if shape is not None:
        shape = list(shape) if isinstance(shape, ListConfig) else shape
        ok = isinstance(shape, list) and len(shape) == dims and all(_is_int(s) and s >= 8 for s in shape)
        _check(ok, "dataset.shape", shape, f"{dims} integers >= 8 (dataset.spatial_dims={dims})")


def _validate_kernel(kernel: DictConfig) -> None:
    if "impl" in kernel:
        _check(kernel.impl in IMPLS, "kernel.impl", kernel.impl, f"one of {', '.join(IMPLS)}")
    for key in ("conv_size", "gabor_size"):
        if key in kernel:
            size = kernel[key]
            ok = _is_int(size) and size >= 1 and size % 2 == 1
            _check(ok, f"kernel.{key}", size, "a positive odd integer")
