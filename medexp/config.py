"""The config schema (registered in Hydra's ConfigStore) and validation with one-line messages.

The schema fixes the top-level keys and the trainer/eval keys with their types; the component groups
(kernel, loss, head, model, dataset, optim, sched) are free-form `_target_` configs. Hydra's struct mode
makes every misspelt key an error; `validate` adds the value ranges. Errors are `ConfigError`s whose text
names the key, the value and what is allowed; the CLI prints them as one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = next(
    p
    for p in (Path(__file__).parent / "conf", Path(__file__).parent.parent / "conf")
    if (p / "train.yaml").exists()
)
GROUPS = (
    "kernel",
    "loss",
    "head",
    "model",
    "dataset",
    "augment",
    "optim",
    "sched",
    "trainer",
    "tracking",
    "experiment",
)


class ConfigError(Exception):
    """A user error in the configuration; its message is one line naming key, value and what is allowed."""


@dataclass
class TrainerConfig:
    max_epochs: int = 100
    devices: int = 1
    accelerator: str = "auto"
    batch_size: int = 2
    num_workers: int = 0
    val_every: int = 1
    precision: str = "32"
    channels_last: bool = True
    compile: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["dice", "jaccard", "hd", "hd95", "asd"])


@dataclass
class SweepConfig:
    skip_finished: bool = False
    gpus_per_job: int = 0


@dataclass
class TrainConfig:
    kernel: Any = None
    loss: Any = None
    head: Any = None
    model: Any = None
    dataset: Any = None
    augment: Any = None
    optim: Any = None
    sched: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    lr: float = 1e-3
    seed: int = 0
    split: int = 0
    n_splits: int = 5
    experiment_name: str = "medexp"
    tracking_uri: str | None = None
    resume: str | None = None


ConfigStore.instance().store(name="base_train", node=TrainConfig)


def group_choices(group: str) -> list[str]:
    """The choices of a config group: the yaml files in conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: expected {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check value ranges of a composed config before anything is built.

    Raises:
        ConfigError: naming the first offending key, its value and what is allowed.
    """
    lr = cfg.lr
    _check(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "lr", lr, "a positive number")
    _check(cfg.n_splits >= 1, "n_splits", cfg.n_splits, "an integer >= 1")
    _check(0 <= cfg.split < cfg.n_splits, "split", cfg.split, f"an integer in 0..{cfg.n_splits - 1}")
    t = cfg.trainer
    _check(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "an integer >= 1")
    _check(t.devices >= 1, "trainer.devices", t.devices, "an integer >= 1")
    _check(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "an integer >= 1")
    _check(t.num_workers >= 0, "trainer.num_workers", t.num_workers, "an integer >= 0")
    _check(t.val_every >= 1, "trainer.val_every", t.val_every, "an integer >= 1")
    _check(
        t.accelerator in ("auto", "cpu", "cuda"),
        "trainer.accelerator",
        t.accelerator,
        "one of auto, cpu, cuda",
    )
    _check(cfg.sweep.gpus_per_job >= 0, "sweep.gpus_per_job", cfg.sweep.gpus_per_job, "an integer >= 0")
    _check(t.precision in ("32", "bf16", "fp16"), "trainer.precision", t.precision, "one of 32, bf16, fp16")
    _validate_dataset(cfg.dataset)
    _validate_kernel(cfg.kernel)
    from medexp.metrics import SUPPORTED

    for name in cfg.eval.metrics:
        _check(name in SUPPORTED, "eval.metrics", name, f"names from {', '.join(SUPPORTED)}")


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
        ok = (
            isinstance(shape, list)
            and len(shape) == dims
            and all(isinstance(s, int) and s >= 8 for s in shape)
        )
        _check(ok, "dataset.shape", shape, f"{dims} integers >= 8 (dataset.spatial_dims={dims})")


def _validate_kernel(kernel: DictConfig) -> None:
    from medexp.nn.conv import KINDS
    from medexp.nn.fftconv import IMPLS

    _check(kernel.kind in KINDS, "kernel.kind", kernel.kind, f"one of {', '.join(KINDS)}")
    impl = kernel.get("impl", "auto")
    _check(impl in IMPLS, "kernel.impl", impl, f"one of {', '.join(IMPLS)}")
    for key in ("conv_size", "gabor_size"):
        size = kernel.get(key)
        _check(
            isinstance(size, int) and size >= 1 and size % 2 == 1,
            f"kernel.{key}",
            size,
            "a positive odd integer",
        )


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (for checkpoints and MLflow artifacts)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """{"trainer.max_epochs": "40", ...}: the resolved config as flat MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)[:6000]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
