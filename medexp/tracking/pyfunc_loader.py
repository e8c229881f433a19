"""The code of every medexp MLflow model: MLflow's pyfunc loader imports this module of the installed medexp
(the model's MLmodel names it as `loader_module`) and calls `_load_pyfunc(data_path)` on the model's
`data/medexp/` folder, so the store holds data only and no code of the store runs (docs/design.md §9).
"""

from __future__ import annotations

from pathlib import Path

from medexp.tracking.models import SegmentationPyfunc, load_data


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> SegmentationPyfunc:
    """The model of `data_path` (weights.pt, config.yaml, info.json); `model_config` is not used."""
    return SegmentationPyfunc(load_data(Path(data_path), str(data_path)))
