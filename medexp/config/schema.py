"""The config schema: the types of the keys medexp reads, registered in Hydra's ConfigStore as `base_train`.

The values live in conf/ only (conf/train.yaml and conf/trainer/default.yaml): every field here is
MISSING, so a default is stated once. The schema adds types (`trainer.max_epochs=abc` fails to compose)
and, with Hydra's struct mode, makes a misspelt key an error. The component groups (kernel, loss, head,
model, dataset, ...) are free-form `_target_` configs; their arguments are checked by the classes they
build and by `medexp.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from medexp.config import paths  # noqa: F401 - registers the resolver of `output_root`


@dataclass
class TrainerConfig:
    max_epochs: int = MISSING
    devices: int = MISSING
    accelerator: str = MISSING
    batch_size: int = MISSING
    num_workers: Any = MISSING  # "auto" or an integer >= 0 (OmegaConf 2.3 has no Union types)
    pin_memory: bool = MISSING
    persistent_workers: bool = MISSING
    prefetch_factor: int = MISSING
    augment_on_device: bool = MISSING
    val_every: int = MISSING
    precision: str = MISSING
    channels_last: bool = MISSING
    compile: bool = MISSING
    progress: bool = MISSING


@dataclass
class EvalConfig:
    metrics: list[str] = MISSING
    # hd95/asd definition, medexp | medpy (medexp.evaluation.metrics.surface_distances). Its default is stated
    # here rather than in conf/train.yaml so that configs logged before the key existed read as they ran.
    distance: str = "medexp"


@dataclass
class SweepConfig:
    skip_finished: bool = MISSING
    gpus_per_job: int = MISSING


@dataclass
class TrainConfig:
    kernel: Any = None
    loss: Any = None
    head: Any = None
    model: Any = None
    input_layer: Any = None
    dataset: Any = None
    augment: Any = None
    optim: Any = None
    sched: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    lr: float = MISSING
    seed: int = MISSING
    split: int = MISSING
    n_splits: int = MISSING
    split_ratios: list[float] = MISSING
    experiment_name: str = MISSING
    tracking_uri: str | None = MISSING
    output_root: str = MISSING
    resume: str | None = MISSING


ConfigStore.instance().store(name="base_train", node=TrainConfig)
