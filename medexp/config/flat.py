"""A resolved config as text (checkpoints, MLflow artifacts) and as flat MLflow params."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from medexp.config.schema import TrainConfig

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml(text: str) -> DictConfig:
    """A config written by `to_yaml` (a checkpoint's, an MLflow run's), typed by the schema again."""
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(text))


def flatten(cfg: DictConfig) -> dict[str, str]:
    """{"trainer.max_epochs": "40", ...}: the resolved config as flat MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)[:MAX_PARAM_LENGTH]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
