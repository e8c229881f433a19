"""Turn a composed config into objects: dataset, model, loss, optimizer, scheduler, augmentation.

Components are chosen by `_target_` in the config groups (the config tree is the registry). A config the
user composed on the command line is trusted input: its `_target_`s are built as given, so a user's own
network (`model._target_=mypkg.Net`) works. A config read back from a checkpoint, a start record or an
MLflow model is data from elsewhere: it reaches these functions only through
medexp.config.untrusted.load_config, which refuses interpolations and every `_target_` outside an exact list.
"""

from __future__ import annotations

import inspect
import logging
from functools import cache
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medexp.data.ignore import IgnoreLabelLoss
from medexp.errors import ConfigError

SPATIAL_LOSSES = ("medexp.losses.BoundaryWeightedCrossEntropyLoss",)  # need every voxel's label (ignore.py)


@cache
def _importable(target: str) -> str | None:
    """None if `target` imports, else why not (one line)."""
    quiet = logging.getLogger("hydra.utils")  # get_object logs its multi-line error before raising it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)
    try:
        hydra.utils.get_object(target)
    except Exception as err:  # noqa: BLE001 - ImportError, AttributeError, or whatever the module raises
        cause = err.__cause__ or err
        return " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
    finally:
        quiet.setLevel(level)
    return None


def check_importable(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError for the first `_target_` of a (trusted) config that cannot be imported,
    so that `model._target_=mypkg.Net` fails before any data is generated or MLflow run created."""
    for key, target in _targets(OmegaConf.to_container(cfg, resolve=False)):
        why = _importable(target)
        if why:
            raise ConfigError(f"{key}._target_={target}: cannot import it ({why})")


def _targets(node: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, target) of every `_target_` in a plain container."""
    if isinstance(node, dict):
        found = [(path or "<root>", str(node["_target_"]))] if "_target_" in node else []
        return found + [t for k, v in node.items() for t in _targets(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in _targets(v, f"{path}[{i}]")]
    return []


def instantiate(node: DictConfig | None, key: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate; errors (unknown class, bad argument) become one-line ConfigErrors. A group
    left empty (null) builds nothing: None."""
    if node is None:
        return None
    container = OmegaConf.to_container(node, resolve=True)
    try:
        return hydra.utils.instantiate(container, **kwargs)
    except InstantiationException as err:
        raise ConfigError(
            f"{key}: cannot build {container.get('_target_')}: {str(err).splitlines()[-1]}"
        ) from err


def _accepts(target: str, argument: str) -> bool:
    """Whether the class or function `target` takes a keyword `argument`."""
    try:
        obj = hydra.utils.get_object(target)
    except Exception as err:  # noqa: BLE001 - hydra raises several types for a bad path
        raise ConfigError(f"_target_={target}: cannot import it ({str(err).splitlines()[0]})") from err
    return argument in inspect.signature(obj).parameters


def kernel_kind(cfg: DictConfig) -> str:
    """ "conventional", "gabor" or "mixed": the `kind` of cfg.kernel's factory class (for tags, names)."""
    return str(getattr(hydra.utils.get_class(cfg.kernel._target_), "kind", cfg.kernel._target_))


def build_dataset(cfg: DictConfig) -> Any:
    """The dataset object of cfg.dataset (has .prepare() -> cases and .info)."""
    return instantiate(cfg.dataset, "dataset")


def build_model(cfg: DictConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Network of cfg.model with the kernel factory of cfg.kernel, the head of cfg.head and the input
    stage of cfg.input_layer."""
    return instantiate(
        cfg.model,
        "model",
        in_channels=in_channels,
        num_classes=num_classes,
        spatial_dims=spatial_dims,
        kernel=instantiate(cfg.kernel, "kernel"),
        head=instantiate(cfg.head, "head"),
        input_layer=instantiate(cfg.input_layer, "input_layer"),
    )


def build_loss(
    cfg: DictConfig, class_frequencies: list[float] | None = None, ignore_label: bool = False
) -> nn.Module:
    """Loss of cfg.loss; losses that take `class_frequencies` (weighted CE, ...) get the training split's.
    With `ignore_label` (the dataset has nnU-Net's ignore label) the loss skips the ignored voxels
    (medexp.data.ignore.IgnoreLabelLoss)."""
    extra = {}
    if _accepts(cfg.loss._target_, "class_frequencies"):
        extra["class_frequencies"] = class_frequencies
    if ignore_label and cfg.loss._target_ in SPATIAL_LOSSES:
        raise ConfigError(
            f"loss._target_={cfg.loss._target_}: its border weights need every voxel's label, and this "
            "dataset has an ignore label; choose another loss (e.g. loss=ce or loss=dice_ce)"
        )
    loss = instantiate(cfg.loss, "loss", **extra)
    return IgnoreLabelLoss(loss) if ignore_label else loss


def build_optimizer(cfg: DictConfig, params: Any) -> Any:
    """Optimizer of cfg.optim at the top-level learning rate cfg.lr."""
    return instantiate(cfg.optim, "optim")(params, lr=cfg.lr)


def build_scheduler(cfg: DictConfig, optimizer: Any, max_epochs: int) -> Any:
    """Epoch-wise LR scheduler of cfg.sched; schedules that take `max_epochs` get the run's length."""
    factory = instantiate(cfg.sched, "sched")
    if "max_epochs" in inspect.signature(factory.func).parameters:
        return factory(optimizer, max_epochs=max_epochs)
    return factory(optimizer)


def build_augmentation(cfg: DictConfig, spatial_dims: int, shape: list[int]) -> list:
    """The random training transforms of cfg.augment for volumes of `shape`."""
    return instantiate(cfg.augment, "augment")(spatial_dims=spatial_dims, shape=list(shape))
