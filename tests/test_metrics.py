"""Metrics (medexp.metrics, medexp.lesions): hand-computed overlaps, distances, lesions and counts."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from medexp.lesions import count_error, count_objects, dbscan_ball_clusters, lesion_metrics
from medexp.metrics import SUPPORTED, case_metrics, foreground_mean


def batch(*maps: np.ndarray) -> torch.Tensor:
    """Label maps (*spatial) -> (B, 1, *spatial) long tensor."""
    return torch.from_numpy(np.stack(maps)[:, None].astype(np.int64))


def cube(shape, lo, hi, label=1) -> np.ndarray:
    """Label map with the box [lo, hi) (per axis) set to `label`."""
    out = np.zeros(shape, dtype=np.int64)
    out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = label
    return out


def balls(shape, centres, radius) -> np.ndarray:
    grid = np.indices(shape)
    out = np.zeros(shape, dtype=bool)
    for c in centres:
        out |= sum((g - x) ** 2 for g, x in zip(grid, c, strict=True)) <= radius**2
    return out


# --- overlap ------------------------------------------------------------------------------------------------


def test_dice_jaccard_two_cubes():
    # Truth [2,6)^3 = 64 voxels, prediction shifted by 1 along axis 0: overlap 3*4*4 = 48 voxels.
    # Dice = 2*48 / (64 + 64) = 0.75; Jaccard = 48 / (64 + 64 - 48) = 0.6. Label 2 is absent from both.
    truth = cube((10, 10, 10), (2, 2, 2), (6, 6, 6))
    pred = cube((10, 10, 10), (3, 2, 2), (7, 6, 6))
    out = case_metrics(batch(pred), batch(truth), 3, ("dice", "jaccard"))
    assert out["dice"].shape == (1, 2)
    assert out["dice"][0].tolist() == pytest.approx([0.75, 1.0])
    assert out["jaccard"][0].tolist() == pytest.approx([0.6, 1.0])


def test_overlap_in_2d_and_batch():
    truth = cube((8, 8), (0, 0), (4, 4))  # 16 pixels
    pred = cube((8, 8), (0, 0), (4, 2))  # 8 pixels inside: Dice 16/24, Jaccard 8/16
    out = case_metrics(batch(pred, truth), batch(truth, truth), 2, ("dice", "jaccard"))
    assert out["dice"][:, 0].tolist() == pytest.approx([2 / 3, 1.0])
    assert out["jaccard"][:, 0].tolist() == pytest.approx([0.5, 1.0])


# --- surface distances (mm) ---------------------------------------------------------------------------------


def test_single_voxels_distance_with_spacing():
    # One voxel each, 2 voxels apart along axis 0 with spacing (2, 1, 1): every distance is 2 * 2 = 4 mm.
    # The same shift along axis 1 (spacing 1) is 2 mm.
    truth = cube((10, 10, 10), (5, 5, 5), (6, 6, 6))
    along0 = cube((10, 10, 10), (7, 5, 5), (8, 6, 6))
    along1 = cube((10, 10, 10), (5, 7, 5), (6, 8, 6))
    out = case_metrics(batch(along0, along1), batch(truth, truth), 2, ("hd", "hd95", "asd"), (2, 1, 1))
    for name in ("hd", "hd95", "asd"):
        assert out[name][:, 0].tolist() == pytest.approx([4.0, 2.0]), name


def brute_force_surface(pred: np.ndarray, true: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm) between the surface voxels (mask minus its 6-connected erosion)."""

    def surface(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * np.asarray(spacing)

    a, b = surface(pred.astype(bool)), surface(true.astype(bool))
    pairwise = np.linalg.norm(a[:, None] - b[None], axis=-1)
    return pairwise.min(1), pairwise.min(0)


def test_shifted_cube_distances():
    # Cube [4,10)^3 shifted by 2 voxels along axis 0, spacing (2, 1, 1). The far faces are 2 voxels = 4 mm
    # from the other cube's surface and nothing is farther: HD = 4 mm. HD95 and ASD against a brute-force
    # computation over the surface voxels.
    spacing = (2.0, 1.0, 1.0)
    truth = cube((16, 16, 16), (4, 4, 4), (10, 10, 10))
    pred = cube((16, 16, 16), (6, 4, 4), (12, 10, 10))
    out = case_metrics(batch(pred), batch(truth), 2, ("hd", "hd95", "asd"), spacing)
    assert out["hd"][0, 0] == pytest.approx(4.0)
    to_true, to_pred = brute_force_surface(pred, truth, spacing)
    hd95 = max(np.percentile(to_true, 95), np.percentile(to_pred, 95))
    assert out["hd95"][0, 0] == pytest.approx(hd95)
    assert out["asd"][0, 0] == pytest.approx(np.concatenate([to_true, to_pred]).mean())


def test_empty_labels_give_documented_values():
    # Label 1: only in the truth; label 2: only in the prediction; label 3: in neither.
    shape = (4, 5, 6)
    truth = cube(shape, (0, 0, 0), (2, 2, 2), 1)
    pred = cube(shape, (2, 2, 2), (4, 4, 4), 2)
    out = case_metrics(batch(pred), batch(truth), 4, SUPPORTED, spacing=(1.0, 2.0, 3.0))
    diagonal = math.sqrt(4**2 + 10**2 + 18**2)  # image diagonal in mm
    expected = {
        "dice": [0, 0, 1],
        "jaccard": [0, 0, 1],
        "hd": [diagonal, diagonal, 0],
        "hd95": [diagonal, diagonal, 0],
        "asd": [diagonal, diagonal, 0],
        "ldice": [0, 0, 1],
        "ltpr": [0, 1, 1],
        "lfpr": [0, 1, 0],
        "lppv": [1, 0, 1],
        "count_error": [1, 1, 0],
    }
    for name, values in expected.items():
        assert out[name][0].tolist() == pytest.approx(values), name
        assert np.isfinite(out[name]).all()


# --- lesion-wise (NeRD) -------------------------------------------------------------------------------------


def test_lesion_metrics_two_lesions():
    # Truth: lesions A and B. Prediction: one lesion overlapping A, two false positives C and D; B missed.
    # GL = 2, PL = 3, TP_g = 1 (A), TP_p = 1: LTPR = 1/2, LPPV = 1/3, LFPR = 2/3, LDice = (1 + 1) / 5.
    true = np.zeros((12, 12), bool)
    true[1:4, 1:4] = True  # A
    true[8:11, 8:11] = True  # B
    pred = np.zeros((12, 12), bool)
    pred[2:5, 2:5] = True  # overlaps A
    pred[1:3, 9:11] = True  # C
    pred[10:12, 1:3] = True  # D
    assert lesion_metrics(pred, true) == pytest.approx(
        {"ldice": 2 / 5, "ltpr": 1 / 2, "lfpr": 2 / 3, "lppv": 1 / 3}
    )
    # One predicted lesion covering both true ones: every true lesion found, no false positive.
    merged = np.zeros((12, 12), bool)
    merged[1:11, 1:11] = True
    assert lesion_metrics(merged, true) == pytest.approx(
        {"ldice": 1.0, "ltpr": 1.0, "lfpr": 0.0, "lppv": 1.0}
    )
    # Through case_metrics, as label 1 of a 2-class map.
    out = case_metrics(batch(pred.astype(int)), batch(true.astype(int)), 2, ("ldice", "ltpr", "lfpr", "lppv"))
    assert [out[k][0, 0] for k in ("ldice", "ltpr", "lfpr", "lppv")] == pytest.approx(
        [0.4, 0.5, 2 / 3, 1 / 3]
    )


def test_lesions_touching_at_a_corner_are_one():
    true = np.zeros((4, 4, 4), bool)
    true[0, 0, 0] = true[1, 1, 1] = True  # 26-connected
    assert lesion_metrics(true, true)["ldice"] == 1.0
    pred = np.zeros_like(true)
    pred[0, 0, 0] = True
    assert lesion_metrics(pred, true)["ltpr"] == 1.0


def test_lesion_metrics_empty():
    empty, some = np.zeros((5, 5), bool), np.eye(5, dtype=bool)
    assert lesion_metrics(empty, empty) == {"ldice": 1.0, "ltpr": 1.0, "lfpr": 0.0, "lppv": 1.0}
    assert lesion_metrics(some, empty) == {"ldice": 0.0, "ltpr": 1.0, "lfpr": 1.0, "lppv": 0.0}
    assert lesion_metrics(empty, some) == {"ldice": 0.0, "ltpr": 0.0, "lfpr": 0.0, "lppv": 1.0}


# --- object counting (Nair et al.) --------------------------------------------------------------------------


def test_count_known_blobs_2d_and_3d():
    three = balls((40, 40, 40), [(10, 10, 10), (28, 12, 25), (15, 30, 30)], 4)
    five = balls((40, 40, 40), [(10, 10, 10), (28, 12, 25), (15, 30, 30), (32, 32, 8), (5, 32, 12)], 3)
    assert count_objects(three) == 3 and count_objects(five) == 5
    assert count_error(three, three) == 0.0
    assert count_error(five, three) == 2.0
    assert count_error(np.zeros_like(three), three) == 3.0
    assert count_error(np.zeros_like(three), np.zeros_like(three)) == 0.0
    discs = balls((64, 64), [(10, 10), (40, 20), (20, 45), (50, 50)], 6)
    assert count_objects(discs) == 4


def test_count_elongated_object_is_one_and_touching_discs_two():
    grid = np.indices((60, 60))
    ellipse = ((grid[0] - 30) / 25.0) ** 2 + ((grid[1] - 30) / 4.0) ** 2 <= 1
    assert count_objects(ellipse) == 1
    touching = balls((60, 60), [(30, 20), (30, 34)], 8)  # overlapping discs: one component, two objects
    assert ndimage.label(touching)[1] == 1
    assert count_objects(touching) == 2


def test_dbscan_ball_clusters_matches_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    points, radii = rng.uniform(0, 30, (60, 3)), rng.uniform(0, 3, 60)
    gap = np.linalg.norm(points[:, None] - points[None], axis=-1) - np.maximum(radii[:, None], radii[None])
    dbscan = sklearn_cluster.DBSCAN(eps=2.0, min_samples=1, metric="precomputed").fit(np.maximum(gap, 0))
    assert dbscan_ball_clusters(points, radii, 2.0) == len(set(dbscan.labels_))


# --- case_metrics contract ----------------------------------------------------------------------------------


def test_case_metrics_all_metrics_fast_and_finite():
    rng = np.random.default_rng(0)
    grid = np.indices((32, 32, 32))
    maps = []
    for _ in range(2):
        label = np.zeros((32, 32, 32), np.int64)
        for k in range(1, 6):
            centre, radius = rng.uniform(8, 24, 3), rng.uniform(2, 8)
            label[sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2] = k
        maps.append(label)
    prediction, truth = batch(maps[0]), batch(maps[1])
    case_metrics(prediction, truth, 6, SUPPORTED)  # warm-up
    start = time.perf_counter()
    out = case_metrics(prediction, truth, 6, SUPPORTED, spacing=(1.0, 1.0, 1.5))
    assert time.perf_counter() - start < 1.0
    assert set(out) == set(SUPPORTED)
    for name, values in out.items():
        assert values.shape == (1, 5) and np.isfinite(values).all(), name
    assert 0.0 <= foreground_mean(out["dice"]) <= 1.0


def test_case_metrics_bad_input():
    a = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4, 4\).*\(1, 1, 4, 4, 5\)"):
        case_metrics(a, torch.zeros(1, 1, 4, 4, 5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="unknown metric"):
        case_metrics(a, a, 2, ("dice", "nope"))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, 2, ("hd",), spacing=(1.0, 1.0))


def test_foreground_mean():
    assert foreground_mean(np.array([[0.5, 1.0], [0.0, 0.5]])) == pytest.approx(0.5)
    assert math.isnan(foreground_mean(np.zeros((1, 0))))
