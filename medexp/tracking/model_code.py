"""The code of every medexp MLflow model ("models from code": MLflow copies this file into the model and
runs it on load, instead of unpickling an object). It needs medexp installed where the model is loaded."""

import mlflow.models

from medexp.tracking.models import SegmentationModel

mlflow.models.set_model(SegmentationModel())
