"""The trained network as an MLflow model: logged by every training run, loadable anywhere that has the
tracking store (mlflow.pyfunc.load_model("runs:/<id>/model"), `models:/NAME/VERSION`, `mlflow models
serve`, `medexp predict`).

The model is a pyfunc written as MLflow "models from code" (model_code.py), so nothing is unpickled on load:
its artifacts are the weights (the best checkpoint's state dict only, loaded with
torch.load(weights_only=True); the resumable checkpoint with optimiser state stays a separate artifact),
the run's resolved config (the network and the preprocessing; its `_target_`s pass the allowlist of
medexp.config.build.check_allowed before anything is built) and the DatasetInfo (classes, channels, label
values). `Segmenter` does the work for both this model and `medexp predict` on a checkpoint:

    image (C, X, Y, Z) and its (4, 4) RAS affine
      -> the dataset's own preprocessing (NIfTI: reorient, resample, pad, resize, normalise)
      -> the network, with MONAI sliding windows where the image is larger than the training shape (a
         model trained on 2D slices predicts the volume's slices and stacks them back)
      -> class probabilities resampled back onto the input grid (MONAI SpatialResample, both affines)
      -> argmax -> the dataset's label values (not class indices)

Serving: input a float32 tensor (C, X, Y, Z); parameter `affine` (16 numbers, row by row, default the
identity); output an int32 label map (X, Y, Z) with the input's grid.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from medexp.config.build import build_dataset, build_model, check_allowed, trusting
from medexp.config.flat import from_yaml, to_yaml
from medexp.data.base import DatasetInfo
from medexp.errors import DataError
from medexp.evaluation.inference import predict_logits

MODEL_NAME = "model"  # runs:/<run id>/model
CODE = Path(__file__).with_name("model_code.py")
IDENTITY = np.eye(4).ravel().tolist()
REQUIREMENTS = ("medexp", "torch", "monai", "nibabel", "pynrrd", "mlflow", "hydra-core", "omegaconf", "numpy")


class Segmenter:
    """A trained network with its preprocessing: an image and its affine in, a label map on its grid out.

    Args:
        cfg: the run's resolved config (network, dataset preprocessing).
        info: the DatasetInfo stored with the weights.
        state_dict: the network's weights.
        device: default CUDA when available, else CPU.
    """

    def __init__(self, cfg, info: DatasetInfo, state_dict: dict, device: torch.device | None = None) -> None:
        self.cfg, self.info = cfg, info
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = build_model(cfg, info.in_channels, info.num_classes, info.spatial_dims)
        net.load_state_dict(state_dict)
        self.model = net.to(self.device).eval()
        self.dataset = build_dataset(cfg)  # for its preprocessing only: the data folder is not read

    @torch.no_grad()
    def probabilities(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Class probabilities (K, X, Y, Z) on the grid of `image` (C, X, Y, Z), voxel-to-world `affine`."""
        from monai import transforms as mt
        from monai.data import MetaTensor

        original_shape = image.shape[1:]
        prepared, grid_affine = self.dataset.preprocess_image(image, affine)
        volume = torch.from_numpy(np.ascontiguousarray(prepared)).to(self.device)  # (C, *spatial)
        if self.info.spatial_dims == 2 and volume.ndim == 4:
            logits = self._slice_logits(volume)  # a slice model on a volume, as it was evaluated
        else:
            logits = predict_logits(self.model, volume[None], self.info.shape)  # sliding window when larger
        probs = torch.softmax(logits, dim=1)[0].cpu()  # (K, *spatial)
        if tuple(probs.shape[1:]) == tuple(original_shape) and np.allclose(grid_affine, affine):
            return probs.numpy()  # predicted on the input's own grid
        resample = mt.SpatialResample(mode="bilinear", padding_mode="zeros")
        moved = MetaTensor(probs, affine=torch.as_tensor(grid_affine, dtype=torch.float64))
        back = resample(
            moved, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=original_shape
        )
        return np.asarray(back)  # (K, X, Y, Z) on the input grid

    def _slice_logits(self, volume: torch.Tensor, slices_per_batch: int = 16) -> torch.Tensor:
        """Logits (1, K, X, Y, Z) of a 2D model for a volume (C, X, Y, Z): the slices across the dataset's
        slice_axis predicted one batch at a time and stacked back, as evaluation scores a volume."""
        axis = getattr(self.dataset, "slice_axis", 2) + 1  # spatial axis k is tensor axis k + 1
        slices = volume.movedim(axis, 0)  # (S, C, *in-plane)
        parts = [
            predict_logits(self.model, slices[i : i + slices_per_batch], self.info.shape)
            for i in range(0, slices.shape[0], slices_per_batch)
        ]  # each (s, K, *in-plane)
        return torch.cat(parts).movedim(0, axis)[None]  # (1, K, X, Y, Z)

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """The label map (X, Y, Z) of class probabilities (K, X, Y, Z), in the dataset's label values."""
        values = np.asarray(self.info.class_values())
        dtype = np.uint8 if values.min() >= 0 and values.max() < 256 else np.int32
        return values.astype(dtype)[probabilities.argmax(axis=0)]

    def segment(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """The label map (X, Y, Z) of `image` (C, X, Y, Z) in the dataset's label values."""
        return self.labels(self.probabilities(image, affine))


class SegmentationModel(PythonModel):
    """The pyfunc flavour of a medexp run: `predict(image, params={"affine": [16 numbers]})`."""

    def load_context(self, context) -> None:
        cfg = from_yaml(Path(context.artifacts["config"]).read_text())
        check_allowed(cfg, "MLflow model config.yaml")  # data from elsewhere: nothing outside the allowlist
        info = DatasetInfo(**json.loads(Path(context.artifacts["info"]).read_text()))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.segmenter = Segmenter(cfg, info, state)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        image = np.asarray(model_input, dtype=np.float32)  # (C, X, Y, Z)
        affine = np.asarray((params or {}).get("affine") or IDENTITY, dtype=np.float64).reshape(4, 4)
        return self.segmenter.segment(image, affine).astype(np.int32)  # (X, Y, Z)


def signature(info: DatasetInfo):
    """Input (C, X, Y, Z) float32, parameter `affine` (16 doubles), output (X, Y, Z) int32 label values."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (info.in_channels, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.int32), (-1, -1, -1))]),
        params=ParamSchema([ParamSpec("affine", "double", IDENTITY, (-1,))]),
    )


def requirements() -> list[str]:
    """Pinned pip requirements of the model (given, so MLflow need not load the model to infer them)."""
    found = []
    for name in REQUIREMENTS:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def log_model(model: torch.nn.Module, cfg, info: DatasetInfo, register_as: str | None = None) -> str:
    """Log `model`'s weights with `cfg` and `info` as the MLflow model of the active run; registered as
    `register_as` (a new version) if given. Returns the model's URI."""
    import mlflow.pyfunc

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    quiet = logging.getLogger("mlflow.pyfunc")  # "Validating input example against model signature"
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="medexp-model-") as tmp:
        folder = Path(tmp)
        torch.save(state, folder / "weights.pt")
        (folder / "config.yaml").write_text(to_yaml(cfg))
        (folder / "info.json").write_text(json.dumps(asdict(info)))
        example = np.zeros((info.in_channels, 8, 8, 8), dtype=np.float32)
        quiet.setLevel(logging.WARNING)
        try:
            with trusting(cfg):  # MLflow loads the model once to check it: the user's own targets are trusted
                logged = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=str(CODE),
                    artifacts={
                        k: str(folder / f)
                        for k, f in (
                            ("weights", "weights.pt"),
                            ("config", "config.yaml"),
                            ("info", "info.json"),
                        )
                    },
                    signature=signature(info),
                    input_example=(example, {"affine": IDENTITY}),
                    pip_requirements=requirements(),
                    registered_model_name=register_as or None,
                )
        finally:
            quiet.setLevel(level)
    return logged.model_uri


def load_segmenter(model_uri: str, tracking_uri: str) -> Segmenter:
    """The Segmenter of an MLflow model (`runs:/<id>/model`, `models:/NAME/VERSION`, `models:/NAME@alias`).

    Raises:
        DataError: one line when the store has no such model.
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        why = " ".join(str(err).split())[:300]
        raise DataError(f"{model_uri}: cannot load this MLflow model from {tracking_uri} ({why})") from err
    python_model = loaded.unwrap_python_model()
    if not isinstance(python_model, SegmentationModel):
        raise DataError(f"{model_uri}: not a medexp segmentation model")
    return python_model.segmenter
