"""The plots every training run logs: learning curves, Fig. 4-style overlays, learned Gabor kernels.

Everything draws with matplotlib's object-oriented API on the Agg canvas (`matplotlib.figure.Figure`, no
pyplot), so nothing depends on a display or on global backend state. Functions take plain data (arrays,
dicts, a model) and return the PNG path; `log_run_plots` is the one call the training job makes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from medexp.data.loaders import make_loader
from medexp.evaluation.inference import predict_logits
from medexp.nn.gabor import GaborConv2d, GaborConv3d
from medexp.report.figures import save_figure
from medexp.tracking import queries

CURVE_KEYS = ("train/loss", "val/dice_mean")


def learning_curves(history: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """train/loss and val/dice_mean per epoch, side by side.

    Args:
        history: {metric key: [(epoch, value), ...]}, e.g. from tracking.metric_history.
        path: PNG to write.
    """
    fig = Figure(figsize=(8, 3.2))
    for ax, key in zip(fig.subplots(1, 2), CURVE_KEYS, strict=True):
        points = history.get(key, [])
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, "o-", markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _label_cmap(num_classes: int) -> tuple[ListedColormap, BoundaryNorm]:
    """Discrete colours for labels 1..K-1 (background is drawn transparent)."""
    base = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74)]
    base += [(0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (0.5, 0.5, 0.5)]
    colours = [base[i % len(base)] for i in range(max(num_classes - 1, 1))]
    return ListedColormap(colours), BoundaryNorm(np.arange(0.5, num_classes, 1.0), len(colours))


def _case_dice(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground labels present in truth or prediction of one case."""
    scores = []
    for k in range(1, num_classes):
        p, t = prediction == k, truth == k
        if p.any() or t.any():
            scores.append(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores)) if scores else math.nan


def _axial(volume: np.ndarray, index: int | None) -> np.ndarray:
    """The axial slice of a (X, Y, Z) volume (last axis fixed, as MONAI loads NIfTI), or a 2D image as is."""
    image = volume if volume.ndim == 2 else volume[..., index]
    return image.T  # (Y, X): x to the right, y up with origin="lower"


def overlays(model: torch.nn.Module, cases: list[dict], info: Any, path: str | Path, device: Any) -> Path:
    """Fig. 4-style picture: per test case, the image, the truth and the prediction on one axial slice.

    The slice is the one with the most foreground voxels in the truth. Labels are overlaid in colour on
    the grey image; the prediction's title gives the case's mean foreground Dice (3D).

    Args:
        cases: case dicts (file paths) as the loaders take them; info: the dataset's DatasetInfo.
    """
    loader = make_loader(cases, batch_size=1, train=False)
    cmap, norm = _label_cmap(info.num_classes)
    fig = Figure(figsize=(9, 3.1 * len(cases) + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(cases), 3, squeeze=False))
    was_training = model.training
    model.eval()
    for row, batch in zip(axes, loader, strict=False):
        image = batch["image"].to(device)  # (1, C, *spatial)
        prediction = predict_logits(model, image, info.shape).argmax(dim=1)[0].cpu().numpy()  # (*spatial)
        truth = batch["label"][0, 0].cpu().numpy()  # (*spatial)
        index = int(np.argmax((truth > 0).reshape(-1, truth.shape[-1]).sum(0))) if truth.ndim == 3 else None
        grey = _axial(batch["image"][0, 0].numpy(), index)
        dice = _case_dice(prediction, truth, info.num_classes)
        where = f", axial slice {index}" if index is not None else ""
        titles = [f"{batch['id'][0]}: image{where}", "truth", f"prediction (Dice {100 * dice:.0f}%)"]
        for ax, labels, title in zip(row, (None, truth, prediction), titles, strict=True):
            ax.imshow(grey, cmap="gray", origin="lower")
            if labels is not None:
                layer = _axial(labels, index).astype(float)
                ax.imshow(
                    np.ma.masked_where(layer == 0, layer), cmap=cmap, norm=norm, alpha=0.55, origin="lower"
                )
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    model.train(was_training)
    names = list(getattr(info, "label_names", []))[1:] or [str(k) for k in range(1, info.num_classes)]
    handles = [Patch(color=cmap(norm(k)), label=name) for k, name in enumerate(names, start=1)]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False
    )
    fig.suptitle("image, ground truth and prediction (cf. Wong & Moradi 2022, Fig. 4)")
    return save_figure(fig, path)


def gabor_kernels(
    model: torch.nn.Module, path: str | Path, layers: int = 4, per_layer: int = 6
) -> Path | None:
    """Learned Gabor kernels: rows = Gabor layers (first to deepest), columns = kernels (out channel j, in 0).

    3D kernels are shown by their central slice with the last axis fixed (the overlays' axial plane).
    Returns None when the model has no Gabor layer.
    """

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, GaborConv2d | GaborConv3d)]
    if not found:
        return None
    picks = [
        found[i] for i in sorted({round(i) for i in np.linspace(0, len(found) - 1, min(layers, len(found)))})
    ]
    fig = Figure(figsize=(1.5 * per_layer + 1.5, 1.75 * len(picks)))
    axes = fig.subplots(len(picks), per_layer, squeeze=False)
    for row, (name, layer) in zip(axes, picks, strict=True):
        with torch.no_grad():
            weight = layer.weight().detach().cpu().float()  # (cout, cin, k, k[, k])
        k = layer.kernel_size
        for j, ax in enumerate(row):
            ax.set_axis_off()
            if j >= weight.shape[0]:
                continue
            kernel = weight[j, 0].numpy()
            plane = kernel[..., k // 2] if kernel.ndim == 3 else kernel  # (k, k)
            vmax = float(np.abs(plane).max()) or 1.0
            ax.imshow(plane.T, cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower")
            ax.set_title(f"out {j}", fontsize=7)
        row[0].text(
            -0.15,
            0.5,
            f"{name}\n{layer.in_channels}->{layer.out_channels}",
            transform=row[0].transAxes,
            ha="right",
            va="center",
            fontsize=7,
        )
    fig.suptitle(f"learned Gabor kernels (central slice, k={picks[0][1].kernel_size}, in channel 0)")
    return save_figure(fig, path)


def log_run_plots(
    tracker: Any,
    model: torch.nn.Module,
    cases: list[dict],
    info: Any,
    output_dir: str | Path,
    *,
    uri: str,
    device: Any,
    predictions: bool = True,
    max_cases: int = 3,
) -> list[Path]:
    """Write the per-run plots under output_dir/plots and log them to the run (artifact folder `plots/`).

    Learning curves come from the run's MLflow metric history. Overlays need a trained model (pass
    predictions=False when no best checkpoint was loaded, e.g. a run that diverged before validating).
    A plotting error never fails the run: it is reported as a warning and the remaining plots still go out.
    """
    out = Path(output_dir) / "plots"
    steps = [
        lambda: learning_curves(
            queries.metric_history(uri, tracker.run_id, list(CURVE_KEYS)), out / "curves.png"
        ),
        lambda: (
            overlays(model, cases[:max_cases], info, out / "overlays.png", device)
            if predictions and cases
            else None
        ),
        lambda: gabor_kernels(model, out / "gabor_kernels.png"),
    ]
    written = []
    for step in steps:
        try:
            path = step()
        except Exception as err:  # noqa: BLE001 - a figure is not worth a failed run
            print(f"warning: plot skipped: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        if path is not None:
            tracker.log_artifact(path, "plots")
            written.append(path)
    return written
