"""Metrics (medexp.evaluation.metrics and .lesions): hand-computed overlaps, distances, lesions and counts."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from medexp.evaluation.lesions import count_error, count_objects, lesion_metrics, local_maxima
from medexp.evaluation.metrics import SUPPORTED, case_metrics, foreground_mean
from medexp.evaluation.summary import foreground_means, write_case_csv

NAN = math.nan


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
    # Dice = 2*48 / (64 + 64) = 0.75; Jaccard = 48 / (64 + 64 - 48) = 0.6. Label 2 is absent from both:
    # undefined (NaN), not a perfect 1.
    truth = cube((10, 10, 10), (2, 2, 2), (6, 6, 6))
    pred = cube((10, 10, 10), (3, 2, 2), (7, 6, 6))
    out = case_metrics(batch(pred), batch(truth), 3, ("dice", "jaccard"))
    assert out["dice"].shape == (1, 2)
    assert out["dice"][0].tolist() == pytest.approx([0.75, NAN], nan_ok=True)
    assert out["jaccard"][0].tolist() == pytest.approx([0.6, NAN], nan_ok=True)


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
    # Label 1: only in the truth; label 2: only in the prediction; label 3: in neither (NaN everywhere).
    # Lesion ratios with a zero denominator are NaN: LPPV/LFPR without predicted lesions (label 1), LTPR
    # without true lesions (label 2).
    shape = (4, 5, 6)
    truth = cube(shape, (0, 0, 0), (2, 2, 2), 1)
    pred = cube(shape, (2, 2, 2), (4, 4, 4), 2)
    out = case_metrics(batch(pred), batch(truth), 4, SUPPORTED, spacing=(1.0, 2.0, 3.0))
    diagonal = math.sqrt(4**2 + 10**2 + 18**2)  # image diagonal in mm
    expected = {
        "dice": [0, 0, NAN],
        "jaccard": [0, 0, NAN],
        "hd": [diagonal, diagonal, NAN],
        "hd95": [diagonal, diagonal, NAN],
        "asd": [diagonal, diagonal, NAN],
        "ldice": [0, 0, NAN],
        "ltpr": [0, NAN, NAN],
        "lfpr": [NAN, 1, NAN],
        "lppv": [NAN, 0, NAN],
        "count_error": [1, 1, NAN],
    }
    for name, values in expected.items():
        assert out[name][0].tolist() == pytest.approx(values, nan_ok=True), name


def test_each_case_uses_its_own_spacing():
    # The same pair of single voxels 2 apart along axis 0 in two cases of spacing 2 mm and 0.5 mm there.
    truth = cube((10, 10, 10), (5, 5, 5), (6, 6, 6))
    pred = cube((10, 10, 10), (7, 5, 5), (8, 6, 6))
    spacings = [(2.0, 1.0, 1.0), (0.5, 1.0, 1.0)]
    out = case_metrics(batch(pred, pred), batch(truth, truth), 2, ("hd", "asd"), spacings)
    assert out["hd"][:, 0].tolist() == pytest.approx([4.0, 1.0])
    assert out["asd"][:, 0].tolist() == pytest.approx([4.0, 1.0])
    with pytest.raises(ValueError, match="3 spacings for a batch of 2"):
        case_metrics(batch(pred, pred), batch(truth, truth), 2, ("hd",), [(1, 1, 1)] * 3)


def test_voxels_outside_the_valid_mask_are_not_scored():
    # Truth [0,4)x[0,4) (16 pixels); the prediction adds 8 pixels in rows 4-5, which are outside `valid`
    # (e.g. an ignore label there): Dice 1 instead of 2*16/(16+24). Label 2 lies only outside: NaN.
    truth = cube((8, 8), (0, 0), (4, 4))
    truth[6:8, 6:8] = 2
    pred = cube((8, 8), (0, 0), (6, 4))
    valid = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    valid[..., 4:8, :] = False
    out = case_metrics(batch(pred), batch(truth), 3, ("dice",), valid=valid)
    assert out["dice"][0].tolist() == pytest.approx([1.0, NAN], nan_ok=True)
    assert case_metrics(batch(pred), batch(truth), 3, ("dice",))["dice"][0, 0] == pytest.approx(32 / 40)


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

    def values(pred, true):
        out = lesion_metrics(pred, true)
        return [out[k] for k in ("ldice", "ltpr", "lfpr", "lppv")]

    assert values(empty, empty) == pytest.approx([NAN] * 4, nan_ok=True)
    assert values(some, empty) == pytest.approx([0.0, NAN, 1.0, 0.0], nan_ok=True)  # 1 false positive
    assert values(empty, some) == pytest.approx([0.0, 0.0, NAN, NAN], nan_ok=True)  # 1 missed lesion


# --- object counting (Nair et al.) --------------------------------------------------------------------------


def bumps(shape, centres, width) -> np.ndarray:
    """A soft prediction: the largest of Gaussian bumps exp(-r^2 / (2 width^2)), one peak of 1 per centre."""
    grid = np.indices(shape).astype(float)
    out = np.zeros(shape)
    for c in centres:
        r2 = sum((g - x) ** 2 for g, x in zip(grid, c, strict=True))
        out = np.maximum(out, np.exp(-r2 / (2 * width**2)))
    return out


def test_count_known_objects_on_soft_maps_2d_and_3d():
    # One peak per object: the local maxima above 0.5 are the centres, DBSCAN gives one cluster each.
    centres3 = [(10, 10, 10), (28, 12, 25), (15, 30, 30)]
    centres5 = [*centres3, (32, 32, 8), (5, 32, 12)]
    three, five = bumps((40, 40, 40), centres3, 3.0), bumps((40, 40, 40), centres5, 3.0)
    assert local_maxima(three).tolist() == [list(map(float, c)) for c in sorted(centres3)]
    assert count_objects(three) == 3 and count_objects(five) == 5
    truth = balls((40, 40, 40), centres3, 3)
    assert count_error(three, truth) == 0.0
    assert count_error(five, truth) == 2.0
    assert count_error(np.zeros_like(three), truth) == 3.0
    assert math.isnan(count_error(np.zeros_like(three), np.zeros_like(truth)))
    assert count_objects(bumps((64, 64), [(10, 10), (40, 20), (20, 45), (50, 50)], 4.0)) == 4


def test_count_touching_objects_with_two_peaks_is_two_and_a_plateau_one():
    # Two bumps 10 pixels apart: their masks above 0.5 touch (one component) but the soft map has two
    # peaks, more than eps = 2 apart: two objects. A flat-topped object (a plateau of maxima, as a
    # saturated softmax gives) is one cluster; so is a binary mask's single component.
    touching = bumps((60, 60), [(30, 25), (30, 35)], 5.0)
    assert ndimage.label(touching > 0.5)[1] == 1
    assert count_objects(touching) == 2
    plateau = np.minimum(1.0, 2 * bumps((60, 60), [(30, 30)], 8.0))
    assert len(local_maxima(plateau)) > 50 and count_objects(plateau) == 1
    grid = np.indices((60, 60))
    ellipse = ((grid[0] - 30) / 25.0) ** 2 + ((grid[1] - 30) / 4.0) ** 2 <= 1
    assert count_objects(ellipse.astype(float)) == 1
    assert count_objects(0.4 * ellipse) == 0, "nothing above the 0.5 threshold"


def test_case_metrics_counts_on_the_soft_prediction():
    # count_error uses `scores` when given: the same argmax map with a two-peak soft label 1 counts 2.
    soft = bumps((40, 40), [(20, 15), (20, 25)], 4.0)
    labels = (soft > 0.5).astype(np.int64)  # one component
    scores = torch.from_numpy(np.stack([1 - soft, soft])[None]).float()  # (1, 2, 40, 40)
    truth = balls((40, 40), [(20, 15), (20, 25)], 3).astype(np.int64)  # two true objects
    assert ndimage.label(truth)[1] == 2
    hard = case_metrics(batch(labels), batch(truth), 2, ("count_error",))
    with_scores = case_metrics(batch(labels), batch(truth), 2, ("count_error",), scores=scores)
    assert hard["count_error"][0, 0] == 1.0 and with_scores["count_error"][0, 0] == 0.0


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
    # label 1: cases 0.5 and 0.0 -> 0.25; label 2 only defined in case 0 -> 1.0; mean 0.625
    assert foreground_mean(np.array([[0.5, 1.0], [0.0, NAN]])) == pytest.approx(0.625)
    assert math.isnan(foreground_mean(np.zeros((1, 0))))
    assert math.isnan(foreground_mean(np.full((2, 2), NAN)))


def test_foreground_means_leave_undefined_cases_out_and_count_them(tmp_path):
    # 3 cases x 2 labels; label "b" is absent (NaN) from cases 1 and 2, label "c" from every case.
    dice = np.array([[0.9, 0.4, NAN], [0.7, NAN, NAN], [0.5, NAN, NAN]])
    out = foreground_means({"dice": dice}, ["background", "a", "b", "c"], "test")
    assert out["test/dice/a"] == pytest.approx(0.7) and out["test/dice/a_n"] == 3
    assert out["test/dice/b"] == pytest.approx(0.4) and out["test/dice/b_n"] == 1
    assert math.isnan(out["test/dice/c"]) and out["test/dice/c_n"] == 0
    assert out["test/dice_mean"] == pytest.approx((0.7 + 0.4) / 2) and out["test/dice_mean_n"] == 3
    path = write_case_csv(tmp_path / "m.csv", ["x", "y", "z"], {"dice": dice}, ["background", "a", "b", "c"])
    lines = path.read_text().splitlines()
    assert lines[0] == "case,label,dice" and len(lines) == 1 + 3 * 3
    assert lines[1:4] == ["x,a,0.9", "x,b,0.4", "x,c,nan"]
