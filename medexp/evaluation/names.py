"""The names of the metrics medexp computes, in a module that imports nothing heavy: config validation
(medexp.config.validate) checks `eval.metrics` and `eval.distance` against them without loading torch or
MONAI (medexp.evaluation.metrics, which computes them, re-exports them)."""

from __future__ import annotations

OVERLAP = ("dice", "jaccard")
DISTANCES = ("hd", "hd95", "asd")
LESION_METRICS = ("ldice", "ltpr", "lfpr", "lppv")  # medexp.evaluation.lesions
SUPPORTED = OVERLAP + DISTANCES + LESION_METRICS + ("count_error",)
DISTANCE_DEFINITIONS = ("medexp", "medpy")  # eval.distance: how hd95 and asd reduce the surface distances
