"""Losses (docs/design.md §7): hand-computed values, MONAI equivalence, the input contract, every conf/loss
choice."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import hydra
import monai.losses
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medexp.losses import (
    BoundaryWeightedCrossEntropyLoss,
    CrossEntropyLoss,
    DiceCELoss,
    DiceLoss,
    ExpLogLoss,
    FocalLoss,
    PCCLoss,
    TverskyLoss,
    WeightedCrossEntropyLoss,
    inverse_frequency_weights,
    unet_weight_map,
)

LOSS_CONFIGS = sorted((Path(__file__).parents[1] / "conf" / "loss").glob("*.yaml"))
LN2 = math.log(2.0)


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """(C, N) probabilities per voxel -> (1, C, 1, N) logits whose softmax gives them back."""
    return torch.tensor(probabilities, dtype=torch.float64).log()[None, :, None, :]


def labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, None, None, :]  # (1, 1, 1, N)


# --- PCC (Wong & Moradi eq. 4) ----------------------------------------------------------------------------


def test_pcc_perfect_and_inverted():
    y = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.float64)[None, :, None, :]  # (1, 2, 1, 4)
    target = y[:, 1:]  # label map: 1 where channel 1 is on
    assert PCCLoss(softmax=False)(y, target).item() == pytest.approx(0.0, abs=1e-6)
    assert PCCLoss(softmax=False)(1.0 - y, target).item() == pytest.approx(1.0, abs=1e-6)
    assert PCCLoss()(40.0 * y, target).item() == pytest.approx(0.0, abs=1e-6)  # logits through softmax


def test_pcc_hand_computed():
    # Label 1: p = [0.8, 0.6, 0.2, 0.4], y = [1, 1, 0, 0]. mean p = 0.5, mean y = 0.5;
    # p - mean = [0.3, 0.1, -0.3, -0.1], y - mean = [0.5, 0.5, -0.5, -0.5];
    # cov = 0.15 + 0.05 + 0.15 + 0.05 = 0.4; sum (p - mean)^2 = 0.2; sum (y - mean)^2 = 1;
    # r = 0.4 / sqrt(0.2) = 0.894427; label 0 (1 - p, 1 - y) has the same r.
    # loss = 1 - 0.5 (r + 1) = 0.5 - r / 2 = 0.5 - 0.447214 = 0.052786 (eps = 1e-7 under the root).
    p = torch.tensor([0.8, 0.6, 0.2, 0.4], dtype=torch.float64)
    scores = torch.stack([1 - p, p])[None, :, None, :]  # (1, 2, 1, 4)
    loss = PCCLoss(softmax=False)(scores, labels([1, 1, 0, 0]))
    assert loss.item() == pytest.approx(0.052786, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 - 0.5 * 0.4 / math.sqrt(0.2 * 1 + 1e-7), abs=1e-9)


def test_pcc_absent_label_finite_with_finite_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 2, (2, 1, 4, 5, 6)).float()  # label 2 never occurs
    loss = PCCLoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # softmax=False: the absent label's r is 0 / sqrt(0 + eps) = 0, so its term is exactly 0.5.
    scores = torch.softmax(logits.detach(), 1)
    both = PCCLoss(softmax=False)(scores, target).item()
    without = PCCLoss(softmax=False)(scores[:, :2], target).item()
    assert both == pytest.approx((2 * without + 0.5) / 3, abs=1e-6)


# --- MONAI's losses behind medexp's contract ---------------------------------------------------------------


def test_dice_ce_hand_computed():
    # Zero logits, 2 classes: p = 0.5 at both voxels, target [0, 1]. Each label: Dice = 2*0.5 / (1 + 1) = 0.5,
    # so the Dice loss is 0.5; the cross-entropy is ln 2. Total 0.5 + 0.693147 = 1.193147.
    loss = DiceCELoss()(torch.zeros(1, 2, 1, 2), labels([0, 1]))
    assert loss.item() == pytest.approx(0.5 + LN2, abs=1e-5)


def test_focal_hand_computed():
    # Voxel 1: p = [0.75, 0.25], true 0; voxel 2: p = [0.25, 0.75], true 1. Focal (gamma 2) per voxel:
    # -(1 - 0.75)^2 ln 0.75 = 0.0625 * 0.287682 = 0.0179801; the voxel mean (Lin et al.) is 0.0179801.
    # MONAI's "mean" also divides by the 2 channels: 0.0089900.
    logits = logits_for([[0.75, 0.25], [0.25, 0.75]])
    loss = FocalLoss(gamma=2.0)(logits, labels([0, 1]))
    assert loss.item() == pytest.approx(0.0625 * -math.log(0.75), abs=1e-7)
    assert loss.item() == pytest.approx(0.0179801, abs=1e-7)
    monai_mean = FocalLoss(gamma=2.0, reduction="mean")(logits, labels([0, 1]))
    assert monai_mean.item() == pytest.approx(0.0089900, abs=1e-7)


def test_focal_with_gamma_0_is_cross_entropy_for_any_number_of_classes():
    # 20 classes as in the paper: the voxel mean does not shrink with C (MONAI's mean would be CE / 20).
    torch.manual_seed(2)
    logits, target = torch.randn(2, 20, 3, 4, 5), torch.randint(0, 20, (2, 1, 3, 4, 5))
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0]).item()
    assert FocalLoss(gamma=0.0)(logits, target.float()).item() == pytest.approx(ce, rel=1e-6)
    assert FocalLoss(gamma=0.0, reduction="mean")(logits, target.float()).item() == pytest.approx(
        ce / 20, rel=1e-6
    )


def test_tversky_hand_computed():
    # p1 = [0.75, 0.5, 0.25], y1 = [1, 1, 0]; alpha (FP) 0.3, beta (FN) 0.7.
    # Label 1: TP = 1.25, FP = 0.25, FN = 0.25 + 0.5 = 0.75 -> T1 = 1.25 / (1.25 + 0.075 + 0.525) = 0.675676.
    # Label 0: p0 = [0.25, 0.5, 0.75], y0 = [0, 0, 1]: TP = 0.75, FP = 0.75, FN = 0.25
    #          -> T0 = 0.75 / (0.75 + 0.225 + 0.175) = 0.652174.
    # loss = 1 - (0.675676 + 0.652174) / 2 = 0.336075.
    logits = logits_for([[0.25, 0.5, 0.75], [0.75, 0.5, 0.25]])
    loss = TverskyLoss(alpha=0.3, beta=0.7)(logits, labels([1, 1, 0]))
    assert loss.item() == pytest.approx(0.336075, abs=1e-5)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (DiceLoss(), monai.losses.DiceLoss(softmax=True, to_onehot_y=True)),
        (DiceCELoss(), monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)),
        (
            FocalLoss(gamma=1.5, reduction="mean"),
            monai.losses.FocalLoss(use_softmax=True, to_onehot_y=True, gamma=1.5),
        ),
        (
            TverskyLoss(alpha=0.4, beta=0.6),
            monai.losses.TverskyLoss(softmax=True, to_onehot_y=True, alpha=0.4, beta=0.6),
        ),
    ],
)
def test_monai_wrappers_equal_monai(ours, theirs):
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, 6, 7)
    target = torch.randint(0, 4, (2, 1, 5, 6, 7))
    expected = theirs(logits, target)
    assert ours(logits, target.float()).item() == pytest.approx(expected.item(), rel=1e-6)
    one_hot = torch.nn.functional.one_hot(target[:, 0], 4).movedim(-1, 1).float()  # (B, C, *spatial)
    assert ours(logits, one_hot).item() == pytest.approx(expected.item(), rel=1e-6)


# --- written here: class-weighted, boundary-weighted, exponential logarithmic ------------------------------


def test_inverse_frequency_weights():
    # f = [0.75, 0.25]: 1/f = [4/3, 4]; sum f/f = K = 2, so w = [2/3, 2] and sum f w = 0.5 + 0.5 = 1.
    assert inverse_frequency_weights([0.75, 0.25]).tolist() == pytest.approx([2 / 3, 2.0])
    # Unnormalised counts give the same weights; an absent class gets a large finite weight.
    assert inverse_frequency_weights([300, 100]).tolist() == pytest.approx([2 / 3, 2.0])
    weights = inverse_frequency_weights([0.8, 0.2, 0.0])
    assert torch.isfinite(weights).all() and weights[2] > weights[1] > weights[0]
    with pytest.raises(ValueError, match="class_frequencies"):
        inverse_frequency_weights([0.0, 0.0])


def test_weighted_ce_hand_computed():
    # Zero logits: -ln p = ln 2 at every voxel. Weights [2/3, 2], targets [0, 1]:
    # mean(2/3 ln 2, 2 ln 2) = (4/3) ln 2 = 0.924196.
    loss = WeightedCrossEntropyLoss([0.75, 0.25])(torch.zeros(1, 2, 1, 2), labels([0, 1]))
    assert loss.item() == pytest.approx(4 / 3 * LN2, abs=1e-6)
    torch.manual_seed(2)
    logits, target = torch.randn(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 1, 4, 4, 4)).float()
    plain = CrossEntropyLoss()(logits, target)
    assert WeightedCrossEntropyLoss(None)(logits, target).item() == pytest.approx(plain.item(), rel=1e-6)


def test_unet_weight_map_hand_computed():
    # Row [1, 0, 0, 1]: two objects (not touching), w_c = 1. Gap x=1: d1 = 1 (to A), d2 = 2 (to B); x=2 the
    # same: term 10 exp(-(1 + 2)^2 / (2 * 5^2)) = 10 exp(-0.18) = 8.352702. Course notes: every pixel,
    # so also x=0 inside A: d1 = 1 (to the nearest pixel outside A), d2 = 3 (to B): 10 exp(-16/50) = 7.261490.
    gap, edge = 10 * math.exp(-9 / 50), 10 * math.exp(-16 / 50)
    assert (gap, edge) == pytest.approx((8.352702, 7.261490), abs=1e-6)
    for row in ([1, 0, 0, 1], [1, 0, 0, 2]):  # two labels count as two objects as well
        w = unet_weight_map(np.array([row]), np.ones(3, np.float32))
        assert w[0].tolist() == pytest.approx([1 + edge, 1 + gap, 1 + gap, 1 + edge], abs=1e-5)
        background = unet_weight_map(np.array([row]), np.ones(3, np.float32), border="background")
        assert background[0].tolist() == pytest.approx([1.0, 1 + gap, 1 + gap, 1.0], abs=1e-5)
    # A single object: no second distance, no border term.
    assert unet_weight_map(np.array([[1, 0, 0, 0]]), np.ones(2)).tolist() == [[1.0] * 4]
    # 3D, [1, 1, 0, 0, 1] along the last axis: gap voxels d1 + d2 = 1 + 2 = 2 + 1 = 3; inside A at x=0:
    # 2 (to x=2) + 4 (to B) = 6, at x=1: 1 + 3 = 4; inside B at x=4: 1 + 3 = 4 (to x=1, A's last voxel).
    # Class weights [0.5, 2] add to every voxel of their class.
    w = unet_weight_map(np.array([1, 1, 0, 0, 1]).reshape(1, 1, 5), np.array([0.5, 2.0]))
    term = [10 * math.exp(-(d**2) / 50) for d in (6, 4, 3, 3, 4)]
    base = [2.0, 2.0, 0.5, 0.5, 2.0]
    assert w.ravel().tolist() == pytest.approx([b + t for b, t in zip(base, term, strict=True)], abs=1e-5)
    with pytest.raises(ValueError, match="border"):
        unet_weight_map(np.array([[1, 0]]), np.ones(2), border="inside")


def test_boundary_weighted_ce_hand_computed():
    # Zero logits: loss = mean(w) ln 2, w = [1 + 7.261490, 1 + 8.352702, 1 + 8.352702, 1 + 7.261490]
    # (every pixel, see above): (4 + 31.228384) / 4 * 0.693147 = 6.104614.
    gap, edge = 10 * math.exp(-9 / 50), 10 * math.exp(-16 / 50)
    loss = BoundaryWeightedCrossEntropyLoss()(torch.zeros(1, 2, 1, 4), labels([1, 0, 0, 1]))
    assert loss.item() == pytest.approx((4 + 2 * gap + 2 * edge) / 4 * LN2, abs=1e-5)
    assert loss.item() == pytest.approx(6.104614, abs=1e-5)
    # Background only: (1 + 9.352702 + 9.352702 + 1) / 4 * ln 2 = 3.587971.
    background = BoundaryWeightedCrossEntropyLoss(border="background")
    assert background(torch.zeros(1, 2, 1, 4), labels([1, 0, 0, 1])).item() == pytest.approx(
        3.587971, abs=1e-5
    )
    # With frequencies, w_c are the inverse-frequency weights [2/3, 2] (labels: 1, 0, 0, 1).
    balanced = BoundaryWeightedCrossEntropyLoss([0.75, 0.25])(torch.zeros(1, 2, 1, 4), labels([1, 0, 0, 1]))
    assert balanced.item() == pytest.approx((2 * (2 + edge) + 2 * (2 / 3 + gap)) / 4 * LN2, abs=1e-5)


def test_explog_hand_computed():
    # Zero logits, 2 classes, target [0, 1], smooth = 1, f = [0.75, 0.25].
    # Dice_i = (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3 for both labels; (-ln 2/3)^0.3 = 0.405465^0.3 = 0.762757.
    # Label weights: (1 / 0.75)^0.5 = 1.154701, (1 / 0.25)^0.5 = 2; (-ln 0.5)^0.3 = 0.693147^0.3 = 0.895875;
    # L_cross = (1.154701 + 2) / 2 * 0.895875 = 1.413109.
    # L = 0.8 * 0.762757 + 0.2 * 1.413109 = 0.610205 + 0.282622 = 0.892827.
    loss = ExpLogLoss([0.75, 0.25])(torch.zeros(1, 2, 1, 2), labels([0, 1]))
    dice_term = (-math.log(2 / 3)) ** 0.3
    cross_term = (math.sqrt(4 / 3) + 2) / 2 * LN2**0.3
    assert loss.item() == pytest.approx(0.8 * dice_term + 0.2 * cross_term, abs=1e-6)
    assert loss.item() == pytest.approx(0.892827, abs=1e-5)


def test_explog_finite_gradient_at_perfect_prediction():
    target = labels([0, 1, 1, 0])
    logits = (60.0 * torch.nn.functional.one_hot(target[0, 0, 0].long(), 2).T[None, :, None, :]).float()
    logits.requires_grad_(True)
    loss = ExpLogLoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# --- every choice in conf/loss: forward/backward in 2D and 3D, the input contract --------------------------


def build(path: Path, num_classes: int):
    cfg = OmegaConf.load(path)
    extra = {}
    if "class_frequencies" in inspect.signature(hydra.utils.get_class(cfg._target_).__init__).parameters:
        extra["class_frequencies"] = [0.7, 0.2, 0.1, 0.0][:num_classes]  # one class absent from training
    return hydra.utils.instantiate(cfg, **extra)


@pytest.mark.parametrize("path", LOSS_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 6)])
def test_every_loss_config_forward_backward(path, spatial):
    torch.manual_seed(3)
    loss_fn = build(path, 4)
    logits = torch.randn(2, 4, *spatial, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, *spatial)).float()  # label 3 absent
    loss = loss_fn(logits, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert loss_fn(logits, target.long()).item() == pytest.approx(loss.item(), rel=1e-6)


MEDEXP_LOSSES = [
    PCCLoss,
    DiceLoss,
    DiceCELoss,
    FocalLoss,
    TverskyLoss,
    WeightedCrossEntropyLoss,
    BoundaryWeightedCrossEntropyLoss,
    ExpLogLoss,
]


@pytest.mark.parametrize("loss_cls", MEDEXP_LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [(2, 1, 4, 4, 5), (1, 1, 4, 4, 4), (2, 4, 4, 4), (2, 2, 4, 4, 4)])
def test_bad_target_shape_names_both_shapes(loss_cls, bad):
    logits = torch.zeros(2, 3, 4, 4, 4)
    with pytest.raises(ValueError) as error:
        loss_cls()(logits, torch.zeros(bad))
    assert str(tuple(bad)) in str(error.value) and "(2, 3, 4, 4, 4)" in str(error.value)
