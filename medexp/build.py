"""Turn a composed config into objects: dataset, model, loss, optimizer, scheduler.

Components are chosen by `_target_` in the config groups (the config tree is the registry). A config read
back from a checkpoint or an MLflow run is data from elsewhere: `instantiate` only builds targets from
ALLOWED_PREFIXES (DESIGN 9).
"""

from __future__ import annotations

import inspect
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medexp.config import ConfigError

ALLOWED_PREFIXES = ("medexp.", "monai.", "torch.")


def _targets(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate restricted to ALLOWED_PREFIXES; errors become one-line ConfigErrors."""
    container = OmegaConf.to_container(node, resolve=True)
    for target in _targets(container):
        if not str(target).startswith(ALLOWED_PREFIXES):
            raise ConfigError(
                f"{key}._target_={target}: expected a class under {', '.join(ALLOWED_PREFIXES)}"
            )
    try:
        return hydra.utils.instantiate(container, **kwargs)
    except hydra.errors.InstantiationException as err:
        raise ConfigError(
            f"{key}: cannot build {container.get('_target_')}: {str(err).splitlines()[-1]}"
        ) from err


def build_dataset(cfg: DictConfig) -> Any:
    """The dataset object of cfg.dataset (has .prepare() -> cases and .info)."""
    return instantiate(cfg.dataset, "dataset")


def build_model(cfg: DictConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Network of cfg.model with the kernel factory of cfg.kernel and the head of cfg.head."""
    kernel = instantiate(cfg.kernel, "kernel")
    head = instantiate(cfg.head, "head")
    return instantiate(
        cfg.model,
        "model",
        in_channels=in_channels,
        num_classes=num_classes,
        spatial_dims=spatial_dims,
        kernel=kernel,
        head=head,
    )


def build_loss(cfg: DictConfig, class_frequencies: list[float] | None = None) -> nn.Module:
    """Loss of cfg.loss; losses that take `class_frequencies` (weighted CE, ...) get the training split's."""
    target = (
        hydra.utils.get_class(cfg.loss._target_)
        if str(cfg.loss._target_).startswith(ALLOWED_PREFIXES)
        else None
    )
    extra = {}
    if target is not None and "class_frequencies" in inspect.signature(target.__init__).parameters:
        extra["class_frequencies"] = class_frequencies
    return instantiate(cfg.loss, "loss", **extra)


def build_optimizer(cfg: DictConfig, params: Any) -> Any:
    """Optimizer of cfg.optim at the top-level learning rate cfg.lr."""
    return instantiate(cfg.optim, "optim")(params, lr=cfg.lr)


def build_scheduler(cfg: DictConfig, optimizer: Any, max_epochs: int) -> Any:
    """Epoch-wise LR scheduler of cfg.sched; schedules that take `max_epochs` get the run's length."""
    factory = instantiate(cfg.sched, "sched")
    if "max_epochs" in inspect.signature(factory.func).parameters:
        return factory(optimizer, max_epochs=max_epochs)
    return factory(optimizer)
