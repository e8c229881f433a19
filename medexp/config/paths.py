"""Where a run writes: the output root, next to the MLflow store the user named (docs/design.md §9).

`output_root` (conf/train.yaml) defaults to `${medexp_output_root:${tracking_uri}}`: the folder of the
sqlite file of `tracking_uri` (or of $MLFLOW_TRACKING_URI), else `outputs`, so with the default store
(sqlite:///outputs/mlflow.db) everything lands in ./outputs as before, and a run started anywhere with
`tracking_uri=sqlite:////data/exp/mlflow.db` keeps its store, artifacts (/data/exp/mlartifacts), Hydra run
folders, demo data and preprocessing caches under /data/exp and writes nothing into the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

DEFAULT_ROOT = "outputs"
RESOLVER = "medexp_output_root"
SQLITE = "sqlite:///"


def sqlite_file(uri: str | None) -> Path | None:
    """The database file of a sqlite MLflow URI (sqlite:///rel.db or sqlite:////abs.db), else None."""
    if not uri or not str(uri).startswith(SQLITE):
        return None
    path = str(uri)[len(SQLITE) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def output_root(tracking_uri: str | None = None) -> str:
    """The folder of the sqlite store `tracking_uri` (else $MLFLOW_TRACKING_URI), or `outputs`."""
    database = sqlite_file(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    return str(database.parent) if database is not None else DEFAULT_ROOT


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, output_root)
