"""nnU-Net's ignore label: the value named `ignore` is no class, and its voxels take no part in the loss
(medexp.data.ignore.IgnoreLabelLoss, checked against the losses' formulas over the annotated voxels)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medexp.config.build import build_loss
from medexp.data.ignore import IgnoreLabelLoss
from medexp.data.labels import IGNORE_INDEX, class_table, class_values, ignore_value
from medexp.errors import ConfigError
from medexp.losses import CrossEntropyLoss, PCCLoss


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g, requires_grad=True)  # (B, C, D, H, W)
    target = torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g)
    target[0, 0, :2] = IGNORE_INDEX  # 60 of image 0's 120 voxels, none of image 1's
    return logits, target


def test_cross_entropy_over_the_annotated_voxels_of_each_image():
    logits, target = _batch()
    loss = IgnoreLabelLoss(CrossEntropyLoss())(logits, target)
    per_image = []
    for b in range(2):
        x = logits[b].detach().reshape(3, -1).T.double()  # (N, C)
        y = target[b, 0].reshape(-1)
        keep = y != IGNORE_INDEX
        log_p = x - torch.logsumexp(x, dim=1, keepdim=True)
        per_image.append(-log_p[keep, y[keep]].mean())
    assert loss.item() == pytest.approx(float(torch.stack(per_image).mean()), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[0, :, :2] == 0) and torch.any(logits.grad[0, :, 2:] != 0)


def test_pcc_over_the_annotated_voxels_equals_eq_4_on_them():
    logits, target = _batch(1)
    loss = IgnoreLabelLoss(PCCLoss())(logits, target)
    terms = []
    for b in range(2):
        y = target[b, 0].reshape(-1).numpy()
        keep = y != IGNORE_INDEX
        x = logits[b].detach().reshape(3, -1).numpy().astype(np.float64)[:, keep]  # (C, N)
        p = np.exp(x) / np.exp(x).sum(0)
        for label in range(3):
            t = (y[keep] == label).astype(float)
            dp, dt = p[label] - p[label].mean(), t - t.mean()
            r = (dp * dt).sum() / np.sqrt((dp**2).sum() * (dt**2).sum() + 1e-7)  # eq. 4
            terms.append(1 - (r + 1) / 2)
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_without_ignored_voxels_the_loss_is_unchanged():
    logits, target = _batch(2)
    target[target == IGNORE_INDEX] = 0
    assert torch.equal(IgnoreLabelLoss(PCCLoss())(logits, target), PCCLoss()(logits, target))


def test_label_table_ignore_and_class_values():
    lut, names = class_table({0: "background", 2: "edema", 4: "tumour", 6: "tumour", 5: "ignore"})
    assert names == ["background", "edema", "tumour"]
    assert lut == {0: 0, 2: 1, 4: 2, 5: IGNORE_INDEX, 6: 2}
    assert class_values(lut, 3) == [0, 2, 4] and ignore_value(lut) == 5


def test_boundary_weighted_ce_is_refused_with_an_ignore_label():
    cfg = OmegaConf.create({"loss": {"_target_": "medexp.losses.BoundaryWeightedCrossEntropyLoss"}})
    with pytest.raises(ConfigError, match="border weights need every voxel's label"):
        build_loss(cfg, [0.5, 0.5], ignore_label=True)
    wrapped = build_loss(OmegaConf.create({"loss": {"_target_": "medexp.losses.PCCLoss"}}), None, True)
    assert isinstance(wrapped, IgnoreLabelLoss)
