"""The two definitions of hd95 and asd (`eval.distance`: medexp | medpy) against a brute-force computation:
every pair of boundary points compared with numpy, on small irregular masks with anisotropic spacing.

The reference below is written from the definitions alone (docs/design.md §9 Evaluation), not from
medexp.evaluation.metrics: a boundary point is a mask voxel with a face neighbour (2 per axis) outside the
mask or outside the image; d_p are the distances (mm) from each boundary point of the prediction to the
nearest one of the truth, d_t the other way.
    medexp: hd95 = max(P95(d_p), P95(d_t)), asd = mean of d_p and d_t pooled (MONAI symmetric);
    medpy:  hd95 = P95(d_p and d_t pooled) (medpy.metric.binary.hd95), asd = mean(d_p) (medpy's asd);
    both:   hd = max of d_p and d_t pooled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medexp.config.compose import compose_config
from medexp.config.validate import validate
from medexp.errors import ConfigError
from medexp.evaluation.metrics import case_metrics


def boundary_points(mask: np.ndarray, spacing) -> np.ndarray:
    """(n, dims) coordinates in mm of the mask's boundary voxels, by shifting the zero-padded mask."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)  # the pad keeps the roll from wrapping around
    inner = interior[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(mask & ~inner) * np.asarray(spacing, dtype=float)


def brute_force(pred: np.ndarray, true: np.ndarray, spacing) -> dict[str, dict[str, float]]:
    a, b = boundary_points(pred, spacing), boundary_points(true, spacing)
    pairs = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # (n_pred, n_true), every pair
    d_p, d_t = pairs.min(axis=1), pairs.min(axis=0)
    pooled = np.concatenate([d_p, d_t])
    return {
        "medexp": {
            "hd": pooled.max(),
            "hd95": max(np.percentile(d_p, 95), np.percentile(d_t, 95)),
            "asd": pooled.mean(),
        },
        "medpy": {"hd": pooled.max(), "hd95": np.percentile(pooled, 95), "asd": d_p.mean()},
    }


def as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.int64))[None, None]  # (1, 1, *spatial)


def irregular_masks(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random-voxel truth and prediction that overlap but whose surfaces are ragged and far apart."""
    rng = np.random.default_rng(seed)
    true = rng.random(shape) < 0.35
    pred = (rng.random(shape) < 0.35) | true & (rng.random(shape) < 0.5)
    pred[(0,) * len(shape)] = true[(0,) * len(shape)] = True  # neither is empty
    return pred, true


CASES = [
    ((7, 8, 9), (0.7, 1.3, 2.5), 0),
    ((7, 8, 9), (2.0, 0.625, 0.625), 1),
    ((12, 10), (0.9, 3.0), 2),
    ((12, 10), (1.0, 1.0), 3),
]


@pytest.mark.parametrize("definition", ["medexp", "medpy"])
@pytest.mark.parametrize(("shape", "spacing", "seed"), CASES)
def test_definitions_match_brute_force(definition, shape, spacing, seed):
    pred, true = irregular_masks(shape, seed)
    expected = brute_force(pred, true, spacing)[definition]
    out = case_metrics(as_batch(pred), as_batch(true), 2, ("hd", "hd95", "asd"), spacing, distance=definition)
    for name, value in expected.items():
        assert out[name][0, 0] == pytest.approx(value, rel=1e-5), name


def test_two_points_by_hand_and_the_definitions_differ():
    # Truth: pixel (0, 0). Prediction: pixels (0, 0) and (3, 0); spacing 2 mm along axis 0, 1 mm along 1.
    # d_p = [0, 6] mm, d_t = [0]. P95 interpolates linearly: P95([0, 6]) = 0.95 * 6 = 5.7;
    # P95([0, 0, 6]) = value at rank 0.95 * 2 = 1.9 = 0 + 0.9 * 6 = 5.4.
    # medexp: hd95 = max(5.7, 0) = 5.7, asd = (0 + 6 + 0) / 3 = 2. medpy: hd95 = 5.4, asd = (0 + 6) / 2 = 3.
    true = np.zeros((6, 4), bool)
    true[0, 0] = True
    pred = true.copy()
    pred[3, 0] = True
    expected = {"medexp": (6.0, 5.7, 2.0), "medpy": (6.0, 5.4, 3.0)}
    for definition, (hd, hd95, asd) in expected.items():
        out = case_metrics(
            as_batch(pred), as_batch(true), 2, ("hd", "hd95", "asd"), (2.0, 1.0), distance=definition
        )
        got = (out["hd"][0, 0], out["hd95"][0, 0], out["asd"][0, 0])
        assert got == pytest.approx((hd, hd95, asd)), definition


def test_empty_sides_score_the_diagonal_in_both_definitions():
    true = np.zeros((3, 4), bool)
    pred = true.copy()
    pred[1, 1] = True
    diagonal = np.hypot(3 * 2.0, 4 * 1.0)
    for definition in ("medexp", "medpy"):
        out = case_metrics(
            as_batch(pred), as_batch(true), 2, ("hd95", "asd"), (2.0, 1.0), distance=definition
        )
        assert (out["hd95"][0, 0], out["asd"][0, 0]) == pytest.approx((diagonal, diagonal))


def test_distance_key_defaults_to_medexp_and_is_checked():
    assert compose_config([]).eval.distance == "medexp"
    cfg = compose_config(["eval.distance=medpy"])
    validate(cfg)
    assert cfg.eval.distance == "medpy"
    with pytest.raises(ConfigError, match=r"eval.distance=assd: expected one of medexp, medpy"):
        validate(compose_config(["eval.distance=assd"]))
    with pytest.raises(ValueError, match="distance='assd'"):
        case_metrics(as_batch(np.ones((2, 2))), as_batch(np.ones((2, 2))), 2, ("hd95",), distance="assd")
