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


# --- WMH: the challenge's label 2 ("other pathology") is ignored (conf/dataset/wmh.yaml) -------------------


def _wmh_folder(root):
    """Three WMH-like subjects: label 1 (lesion, 6 x 6 x 3 voxels) and 2 (other pathology, 6 x 6 x 2) blocks,
    FLAIR bright on both (150 and 125 over a background of 100: 1 and 0.5 after [0, 1] scaling)."""
    import nibabel as nib

    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        label = np.zeros((36, 36, 3), np.uint8)
        label[8 + i : 14 + i, 8:14, :] = 1
        label[20:26, 20:26, 1:] = 2
        flair = (100 + 50 * (label == 1) + 25 * (label == 2)).astype(np.float32)
        affine = np.diag([1.0, 1.0, 3.0, 1.0])
        for name, image in (("t1", (80 + label).astype(np.float32)), ("flair", flair)):
            nib.save(nib.Nifti1Image(image, affine), root / "images" / f"s{i}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"s{i}.nii.gz")


class _Lesions(torch.nn.Module):
    """Lesion probability 0.99 where FLAIR is 1 (label 1), 0.01 where it is 0 (background) and `other` where
    it is 0.5 (label 2): models that differ on the label-2 voxels only."""

    def __init__(self, other: float) -> None:
        super().__init__()
        self.other = other

    def forward(self, image):
        flair = image[:, 1:2]  # (B, 1, H, W)
        lesion = torch.where(flair > 0.75, 0.99, 0.01)
        lesion = torch.where((flair - 0.5).abs() < 0.1, self.other, lesion)
        return torch.cat([1 - lesion, lesion], dim=1)  # probabilities, as head.output=mlp_sigmoid gives


def _wmh_loss_and_dice(tmp_path, labels: dict | None):
    from medexp.config.build import build_dataset
    from medexp.config.compose import compose_config
    from medexp.data.loaders import make_loader
    from medexp.evaluation.inference import evaluate

    overrides = ["experiment=nerd_wmh", f"dataset.root={tmp_path / 'wmh'}", "dataset.shape=[32,32]"]
    cfg = compose_config([*overrides, f"dataset.cache_dir={tmp_path / 'cache'}"])
    if labels:
        cfg.dataset.labels = labels
    dataset = build_dataset(cfg)
    cases = dataset.prepare()
    info = dataset.info
    loss_fn = build_loss(cfg, None, ignore_label=info.ignore_index is not None)  # as medexp.run.train does
    slices = list(make_loader(cases, batch_size=1, train=False))  # all 3 x 3 slices, one batch for the loss
    image = torch.cat([item["image"].as_subclass(torch.Tensor) for item in slices])
    target = torch.cat([item["label"].as_subclass(torch.Tensor) for item in slices])
    out = {}
    for other in (0.01, 0.99):
        table = evaluate(
            _Lesions(other), make_loader(cases, batch_size=1, train=False), num_classes=info.num_classes,
            roi_size=info.shape, device=torch.device("cpu"), metrics=["dice"], ignore_label=info.ignore_index,
        )  # fmt: skip
        out[other] = (float(loss_fn(_Lesions(other)(image), target)), table.values["dice"][:, 0].tolist())
    return info, target, out


def test_wmh_label_2_changes_neither_the_loss_nor_the_dice(tmp_path):
    # Predicting lesion on the label-2 voxels (0.99) or not (0.01) gives the same loss and Dice: those
    # voxels are ignored. Control: the old mapping (2 -> background) makes them false positives.
    _wmh_folder(tmp_path / "wmh")
    info, target, out = _wmh_loss_and_dice(tmp_path, None)
    assert info.ignore_index == IGNORE_INDEX and info.label_names == ["background", "wmh"]
    assert int((target == IGNORE_INDEX).sum()) > 0  # label 2 reached the loss as the ignore index
    assert out[0.99] == out[0.01]
    assert out[0.01][1] == [1.0, 1.0, 1.0]  # label 1 found exactly in every volume
    _, _, old = _wmh_loss_and_dice(tmp_path, {0: "background", 1: "wmh", 2: "background"})
    assert old[0.99][0] > old[0.01][0] + 0.01  # the control: label-2 predictions cost loss ...
    assert old[0.99][1] == pytest.approx([0.75] * 3)  # ... and Dice: 2 x 108 / (108 + 108 + 72) = 0.75
    assert old[0.01][1] == [1.0, 1.0, 1.0]
