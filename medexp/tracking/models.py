"""The trained network as an MLflow model: logged by every training run, loadable anywhere that has the
tracking store and medexp installed (mlflow.pyfunc.load_model("runs:/<id>/model"), `models:/NAME/VERSION`,
`mlflow models serve`, `medexp predict`).

The store holds data only, never code (docs/design.md §9, "Model hand-off"): the model is a pyfunc whose
code is the installed medexp (`loader_module=medexp.tracking.pyfunc_loader`, MLflow's
`_load_pyfunc(data_path)` convention), and its folder `data/medexp/` holds the weights (the best
checkpoint's state dict only, read with torch.load(weights_only=True)), the run's resolved config (read
with medexp.config.untrusted.load_config: no interpolation, exact targets) and the DatasetInfo (classes,
channels, label values). `medexp predict` reads those three files by their fixed names and nothing else of
the model folder: not the MLmodel file, whose `loader_module`, `code` and `python_model` entries direct
MLflow's own loader to code, so a rewritten MLmodel or an added file cannot change what medexp runs.
`Segmenter` does the work for both this model and `medexp predict` on a checkpoint:

    image (C, X, Y, Z) and its (4, 4) RAS affine
      -> the dataset's own preprocessing (NIfTI: reorient, resample, pad, resize, normalise)
      -> the network, with MONAI sliding windows where the image is larger than the training shape (a
         model trained on 2D slices predicts the volume's slices and stacks them back)
      -> class probabilities resampled back onto the input grid (MONAI SpatialResample, both affines)
      -> argmax -> the dataset's label values (not class indices)

Serving: input a float32 tensor (C, X, Y, Z); parameter `affine` (16 numbers, row by row; required, never
assumed); output an int32 label map (X, Y, Z) with the input's grid.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from packaging.version import InvalidVersion, Version

from medexp.config.build import build_dataset, build_model
from medexp.config.flat import to_yaml
from medexp.config.untrusted import load_config, trusting
from medexp.data.base import DatasetInfo
from medexp.errors import DataError
from medexp.evaluation.inference import predict_logits
from medexp.nn.heads import outputs_probabilities

MODEL_NAME = "model"  # runs:/<run id>/model
LOADER_MODULE = "medexp.tracking.pyfunc_loader"
DATA_DIR = "data/medexp"  # the model's data inside its folder: weights.pt, config.yaml, info.json
LEGACY_DIR = "artifacts"  # the same files in models logged "from code" by earlier medexp versions
FILES = ("weights.pt", "config.yaml", "info.json")
REQUIREMENTS = ("torch", "monai", "nibabel", "pynrrd", "mlflow", "hydra-core", "omegaconf", "numpy")


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
        if not outputs_probabilities(self.model):  # head.output=mlp_sigmoid gives probabilities already
            logits = torch.softmax(logits, dim=1)
        probs = logits[0].cpu()  # (K, *spatial)
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


def load_data(folder: Path, source: str) -> Segmenter:
    """The Segmenter of a model's data folder (weights.pt, config.yaml, info.json), every file checked:
    the config by medexp.config.untrusted.load_config, the weights with weights_only, the info's keys.

    Raises:
        ConfigError, DataError: one line naming the file.
    """
    cfg = load_config((folder / "config.yaml").read_text(), f"{source}/config.yaml")
    try:
        raw = json.loads((folder / "info.json").read_text())
        info = DatasetInfo(**{k: raw[k] for k in raw if k in {f.name for f in fields(DatasetInfo)}})
    except (ValueError, TypeError) as err:
        raise DataError(f"{source}/info.json: not a dataset description ({err})"[:300]) from err
    try:
        state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        why = "the file needs code to load, not only tensors"
        raise DataError(f"{source}/weights.pt: refused: {why}") from err
    except Exception as err:  # truncated or foreign file: RuntimeError, EOFError, ...
        raise DataError(f"{source}/weights.pt: not readable weights ({type(err).__name__})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{source}/weights.pt: not a state dict (names to tensors)")
    return Segmenter(cfg, info, state)


class SegmentationPyfunc:
    """What MLflow's pyfunc loader gets from `_load_pyfunc`: `predict(image, params={"affine": [16]})`."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        image = np.asarray(model_input, dtype=np.float32)  # (C, X, Y, Z)
        channels = self.segmenter.info.in_channels
        if image.ndim != 4 or image.shape[0] != channels:
            raise DataError(f"model input: expected an array ({channels}, X, Y, Z), got shape {image.shape}")
        affine = np.asarray((params or {}).get("affine") or [], dtype=np.float64)
        if affine.size != 16 or not np.isfinite(affine).all():
            raise DataError(
                "params['affine']: required: the 16 numbers, row by row, of the volume's voxel-to-world "
                f"matrix (got {affine.size} numbers; the identity is never assumed)"
            )
        return self.segmenter.segment(image, affine.reshape(4, 4)).astype(np.int32)  # (X, Y, Z)


def signature(info: DatasetInfo):
    """Input (C, X, Y, Z) float32, parameter `affine` (16 doubles, required: its default is empty and
    refused), output (X, Y, Z) int32 label values."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (info.in_channels, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.int32), (-1, -1, -1))]),
        params=ParamSchema([ParamSpec("affine", "double", [], (-1,))]),
    )


def _public(version: str) -> str:
    """A version pip can install from an index: the local label dropped (2.13.0+cpu -> 2.13.0)."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version.split("+", 1)[0]


def medexp_requirement() -> str:
    """medexp as pip can install it: the VCS URL and commit pip recorded (PEP 610 direct_url.json), the
    wheel, sdist or folder it was installed from, else the version (from an index)."""
    from medexp.tracking.store import _direct_url

    version = _public(metadata.version("medexp"))
    direct = _direct_url()
    vcs = direct.get("vcs_info", {})
    if direct.get("url") and vcs.get("vcs") and vcs.get("commit_id"):
        return f"medexp @ {vcs['vcs']}+{direct['url']}@{vcs['commit_id']}"
    if direct.get("url"):
        return f"medexp @ {direct['url']}"  # a file:// wheel, sdist or folder (where that path exists)
    return f"medexp=={version}"


def requirements() -> list[str]:
    """pip requirements of the model, installable where MLflow creates the model's environment: public
    versions (no local build labels), medexp by `medexp_requirement`."""
    found = [medexp_requirement()]
    for name in REQUIREMENTS:
        try:
            found.append(f"{name}=={_public(metadata.version(name))}")
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
        folder = Path(tmp) / Path(DATA_DIR).name  # copied by MLflow to data/medexp
        folder.mkdir()
        torch.save(state, folder / "weights.pt")
        (folder / "config.yaml").write_text(to_yaml(cfg))
        (folder / "info.json").write_text(json.dumps(asdict(info)))
        example = np.zeros((info.in_channels, 8, 8, 8), dtype=np.float32)
        quiet.setLevel(logging.WARNING)
        try:
            with trusting(cfg):  # MLflow loads the model once to check it: the user's own targets are trusted
                logged = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    loader_module=LOADER_MODULE,
                    data_path=str(folder),
                    signature=signature(info),
                    input_example=(example, {"affine": np.eye(4).ravel().tolist()}),
                    pip_requirements=requirements(),
                    registered_model_name=register_as or None,
                )
        finally:
            quiet.setLevel(level)
    return logged.model_uri


def load_segmenter(model_uri: str, tracking_uri: str) -> Segmenter:
    """The Segmenter of an MLflow model (`runs:/<id>/model`, `models:/NAME/VERSION`, `models:/NAME@alias`)
    from its data files alone (`load_data`); nothing of the model folder is imported or unpickled.

    Raises:
        DataError: one line when the store has no such model, or it is not a medexp model.
    """
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="medexp-predict-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        except (MlflowException, OSError) as err:
            why = " ".join(str(err).split())[:300]
            where = f"{model_uri}: cannot load this MLflow model from {tracking_uri}"
            raise DataError(f"{where} ({why})") from err
        for sub in (DATA_DIR, LEGACY_DIR):
            folder = local / sub
            if all((folder / f).is_file() and not (folder / f).is_symlink() for f in FILES):
                return load_data(folder, f"{model_uri}/{sub}")
    raise DataError(f"{model_uri}: not a medexp segmentation model (no {DATA_DIR}/{{{','.join(FILES)}}})")
