"""`medexp predict RUN_ID -i FILE_OR_DIR -o DIR`: NIfTI volumes in, label maps on the input's grid out.

Each input is preprocessed exactly as the run's training data (for `dataset=nifti`: reorientation,
isotropic resampling, zero-padding, resizing, normalisation - medexp.data.transforms.preprocess_case),
segmented with MONAI's sliding-window inference wherever the volume is larger than the training shape,
and the class probabilities are resampled back onto the input's own voxel grid (MONAI SpatialResample
through the world coordinates of both affines) before the argmax. The output has the input's shape and
affine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from omegaconf import OmegaConf
from rich.progress import track

from medexp import build, checkpoint
from medexp.config import TrainConfig
from medexp.data.base import DataError, DatasetInfo
from medexp.data.transforms import preprocess_case
from medexp.evaluation import predict_logits
from medexp.tracking import find_output_dir, resolve_uri

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def input_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus the NIfTI files of every folder given (sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not found:
                raise DataError(f"{item}: no .nii or .nii.gz files in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return files


class Predictor:
    """The best checkpoint of a training run, ready to segment volumes like the run's training data."""

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        output_dir = Path(find_output_dir(run_id, resolve_uri(tracking_uri)))
        best = output_dir / "checkpoints" / "best.pt"
        if not best.exists():
            raise DataError(f"run {run_id}: no best checkpoint at {best}")
        state = checkpoint.load(best)
        self.cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(state["config"]))
        self.info = DatasetInfo(**state["info"]) if "info" in state else build.build_dataset(self.cfg).info
        if self.info.spatial_dims != 3:
            raise DataError(f"run {run_id}: medexp predict segments 3D volumes; this run trained a 2D model")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        info = self.info
        self.model = build.build_model(self.cfg, info.in_channels, info.num_classes, info.spatial_dims)
        self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()
        self.preprocess = str(self.cfg.dataset._target_).endswith("NiftiDataset")

    def read(self, path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
        """(C, X, Y, Z) float32 image and the NIfTI it came from; one-line DataError if unusable."""
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as err:  # nibabel raises many types for truncated/corrupt files
            raise DataError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from err
        data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0) if data.ndim == 4 else None
        if data is None or data.shape[0] != self.info.in_channels:
            channels = self.info.in_channels
            expected = "a 3D volume" if channels == 1 else f"a 4D volume with {channels} channels (last axis)"
            raise DataError(f"{path}: shape {img.shape} does not fit the model: expected {expected}")
        if not np.isfinite(data).all():
            raise DataError(f"{path}: contains NaN or infinite voxels")
        return data, img

    @torch.no_grad()
    def probabilities(self, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Class probabilities (K, X, Y, Z) on the input's own grid."""
        grid_affine, original_shape = affine, data.shape[1:]
        if self.preprocess:
            d = self.cfg.dataset
            spacing = (
                None if d.spacing is None else [float(d.spacing)] * 3 if np.isscalar(d.spacing) else d.spacing
            )
            label = np.zeros((1, *data.shape[1:]), dtype=np.uint8)
            data, _, record = preprocess_case(
                data, label, affine, target=list(d.shape), spacing=spacing, orientation=d.orientation,
                normalize=d.normalize,
            )  # fmt: skip
            grid_affine = np.asarray(record["affine"])
        image = torch.from_numpy(data)[None].to(self.device)  # (1, C, *spatial)
        logits = predict_logits(self.model, image, self.info.shape)  # sliding window when larger
        probs = torch.softmax(logits, dim=1)[0].cpu()  # (K, *spatial)
        if not self.preprocess:
            return probs.numpy()
        resample = mt.SpatialResample(mode="bilinear", padding_mode="zeros")
        moved = MetaTensor(probs, affine=torch.as_tensor(grid_affine, dtype=torch.float64))
        back = resample(
            moved, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=original_shape
        )
        return np.asarray(back)  # (K, X, Y, Z) on the input grid

    def segment(self, path: Path, out_dir: Path, with_probabilities: bool = False) -> Path:
        """Write <out_dir>/<input name>: the label map, with the input's shape and affine."""
        data, img = self.read(path)
        probs = self.probabilities(data, img.affine)  # (K, X, Y, Z)
        labels = probs.argmax(axis=0).astype(np.uint8 if self.info.num_classes < 256 else np.int16)
        out = out_dir / path.name
        header = img.header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_data_shape(labels.shape)
        nib.save(nib.Nifti1Image(labels, img.affine, header), str(out))
        if with_probabilities:
            stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
            prob_img = nib.Nifti1Image(
                np.moveaxis(probs, 0, -1).astype(np.float32), img.affine
            )  # (X, Y, Z, K)
            nib.save(prob_img, str(out_dir / f"{stem}_probabilities.nii.gz"))
        return out


def predict(run_id: str, inputs: list[str], out_dir: str, probabilities: bool = False, tracking_uri=None):
    """Segment every input file with run `run_id`'s best checkpoint; returns the written paths."""
    files = input_files(inputs)
    predictor = Predictor(run_id, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [predictor.segment(f, out, probabilities) for f in track(files, description="predict")]
