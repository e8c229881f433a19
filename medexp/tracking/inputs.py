"""The dataset of a run as MLflow dataset inputs (mlflow.log_input): which cases trained, validated and
tested it, from which folder. Only a table describing the cases is logged (case id and file of each case
of each part of the split), never the images: MLflow keeps its digest, schema and source, so two runs on
the same cases show the same dataset in the UI, and a changed split or folder shows as another one.
"""

from __future__ import annotations

import warnings

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def case_table(cases: list[dict]):
    """A pandas DataFrame of one part's cases: case id, image and label file (as the run reads them)."""
    import pandas as pd

    rows = [{"case": str(c["id"]), "image": str(c["image"]), "label": str(c["label"])} for c in cases]
    return pd.DataFrame(rows, columns=["case", "image", "label"])


def log_dataset(parts: dict[str, list[dict]], info) -> None:
    """Log each part of the split (train, val, test) of the active MLflow run as a dataset input.

    Args:
        parts: {"train": [case dict, ...], "val": [...], "test": [...]} as the job splits them.
        info: the DatasetInfo (its name, and the data folder as the dataset's source).
    """
    import mlflow
    import mlflow.data

    source = str(info.source or info.root)
    for part, cases in parts.items():
        with warnings.catch_warnings():
            # MLflow registers its local-file dataset source twice and warns that a path "can be
            # interpreted in multiple ways" (both are the same LocalArtifactDatasetSource).
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            dataset = mlflow.data.from_pandas(case_table(cases), source=source, name=f"{info.name}-{part}")
        mlflow.log_input(dataset, context=CONTEXTS.get(part, part))
