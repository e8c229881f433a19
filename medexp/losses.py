"""Segmentation losses (docs/design.md §7): PCC (Wong & Moradi eq. 4), MONAI's Dice family behind medexp's
target contract, and the weighted cross-entropies and exponential logarithmic loss that MONAI lacks.

Input contract of every loss here: `loss(input, target)` with input the logits (B, C, *spatial), 2D or 3D,
and target a (B, 1, *spatial) label map (float or integer) or a (B, C, *spatial) float one-hot. A target
that fits neither raises ValueError naming both shapes. Losses whose __init__ takes `class_frequencies`
receive from the runner the fraction of voxels of each class (background first) in the training split.
"""

from __future__ import annotations

from collections.abc import Sequence

import monai.losses
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

TINY = 1e-12  # floor under -ln(.) before a fractional power: keeps x^gamma's gradient finite at x = 0


def check_target(input: Tensor, target: Tensor) -> None:
    """Raise ValueError naming both shapes unless target is (B, 1, *spatial) or (B, C, *spatial) for input."""
    if input.ndim < 3:
        raise ValueError(f"expected input (B, C, *spatial), got input shape {tuple(input.shape)}")
    fits = (
        target.ndim == input.ndim
        and target.shape[0] == input.shape[0]
        and target.shape[2:] == input.shape[2:]
        and target.shape[1] in (1, input.shape[1])
    )
    if not fits:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            "expected (B, 1, *spatial) labels or (B, C, *spatial) one-hot"
        )


def as_one_hot(target: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """Target (B, 1, *spatial) label map or (B, C, *spatial) one-hot -> float one-hot like `like`.

    Raises:
        ValueError: naming both shapes when the target fits neither form.
    """
    if target.ndim != like.ndim or target.shape[0] != like.shape[0] or target.shape[2:] != like.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(like.shape)}: "
            "expected (B, 1, *spatial) labels or (B, C, *spatial) one-hot"
        )
    if target.shape[1] == num_classes and num_classes > 1 and target.is_floating_point():
        return target.to(like.dtype)
    if target.shape[1] != 1:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(like.shape)}: "
            f"expected 1 or {num_classes} channels"
        )
    labels = target[:, 0].long()  # (B, *spatial)
    one_hot = F.one_hot(labels, num_classes)  # (B, *spatial, C)
    return one_hot.movedim(-1, 1).to(like.dtype)  # (B, C, *spatial)


def as_labels(input: Tensor, target: Tensor) -> Tensor:
    """Checked target -> (B, *spatial) long label map (a one-hot target is arg-maxed over channels)."""
    check_target(input, target)
    if target.shape[1] == input.shape[1] > 1 and target.is_floating_point():
        return target.argmax(dim=1)  # (B, *spatial)
    return target[:, 0].long()  # (B, *spatial)


def inverse_frequency_weights(class_frequencies: Sequence[float], min_frequency: float = 1e-6) -> Tensor:
    """Class weights inverse to label frequency: w_k proportional to 1 / f_k (course notes, weighted losses).

    Normalisation: the frequencies are rescaled to sum to 1, and the weights so that the expected weight of a
    training voxel is 1, sum_k f_k w_k = 1, i.e. w_k = 1 / (K f_k) when every class occurs. The weighted
    loss then has the scale of the unweighted one. A class absent from the training split (f_k = 0) is
    floored at `min_frequency` so its weight is large but finite.

    Args:
        class_frequencies: K fractions of voxels per class, background first.
        min_frequency: floor for f_k before inversion.

    Returns:
        (K,) float32 tensor of weights.
    """
    freq = torch.as_tensor(class_frequencies, dtype=torch.float64)
    if freq.ndim != 1 or freq.numel() < 2 or (freq < 0).any() or freq.sum() <= 0:
        raise ValueError(f"class_frequencies must be K >= 2 non-negative fractions, got {class_frequencies}")
    freq = freq / freq.sum()
    inverse = 1.0 / freq.clamp_min(min_frequency)
    return (inverse / (freq * inverse).sum()).float()


class PCCLoss(nn.Module):
    """Pearson's correlation coefficient loss, Wong & Moradi eq. 4.

    For every image b and label l, over the N voxels i:
        r_bl = sum_i (p_i - mean p)(y_i - mean y)
               / sqrt(sum_i (p_i - mean p)^2 * sum_i (y_i - mean y)^2 + eps)
        PCC_bl = 0.5 (r_bl + 1)
    and the loss is the mean of (1 - PCC_bl) over labels (background included) and images, so it lies in
    [0, 1]: 0 perfect, 0.5 random, 1 total disagreement. eps keeps an absent label (all y equal) finite.

    Args:
        softmax: apply softmax over the channel axis to the input (input = logits); otherwise the input is
            already scores in [0, 1].
        include_background: keep channel 0 in the mean (not stated in eq. 4; medexp's choice).
        eps: the paper's epsilon, 1e-7.
    """

    def __init__(self, softmax: bool = True, include_background: bool = True, eps: float = 1e-7) -> None:
        super().__init__()
        self.softmax = softmax
        self.include_background = include_background
        self.eps = eps

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.ndim < 3:
            raise ValueError(f"PCCLoss expects input (B, C, *spatial), got {tuple(input.shape)}")
        scores = torch.softmax(input, dim=1) if self.softmax else input
        truth = as_one_hot(target, input.shape[1], scores)
        if not self.include_background:
            scores, truth = scores[:, 1:], truth[:, 1:]
        p = scores.flatten(2)  # (B, C, N)
        y = truth.flatten(2)  # (B, C, N)
        p = p - p.mean(dim=2, keepdim=True)
        y = y - y.mean(dim=2, keepdim=True)
        covariance = (p * y).sum(dim=2)  # (B, C)
        r = covariance / torch.sqrt((p * p).sum(dim=2) * (y * y).sum(dim=2) + self.eps)
        return (1.0 - 0.5 * (r + 1.0)).mean()


class CrossEntropyLoss(nn.Module):
    """Categorical cross-entropy on logits with a (B, 1, *spatial) label map or one-hot target.

    A thin adapter over torch's cross-entropy: MONAI has no plain CE loss with this target contract.
    """

    def __init__(self, weight: list[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.tensor(weight, dtype=torch.float32))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        truth = as_one_hot(target, input.shape[1], input)
        return F.cross_entropy(input, truth.argmax(dim=1), weight=self.weight)


# --- MONAI's losses behind medexp's target contract -------------------------------------------------------
# MONAI raises AssertionError (not ValueError) for some bad target shapes and needs a (B, 1, *spatial) label
# map with to_onehot_y; these subclasses check first, accept a one-hot target too, and fix to_onehot_y=True.


class _LabelMapTarget:
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        labels = as_labels(input, target).unsqueeze(1)  # (B, 1, *spatial)
        return super().forward(input, labels)


class DiceLoss(_LabelMapTarget, monai.losses.DiceLoss):
    """Soft Dice loss, Wong & Moradi eq. 5: E_l[1 - (2 sum p y + eps) / (sum p + sum y + eps)] (MONAI)."""

    def __init__(self, softmax: bool = True, include_background: bool = True, **kwargs) -> None:
        super().__init__(softmax=softmax, include_background=include_background, to_onehot_y=True, **kwargs)


class DiceCELoss(_LabelMapTarget, monai.losses.DiceCELoss):
    """lambda_dice * soft Dice (eq. 5) + lambda_ce * categorical cross-entropy (MONAI's DiceCELoss)."""

    def __init__(
        self, softmax=True, include_background=True, lambda_dice=1.0, lambda_ce=1.0, **kwargs
    ) -> None:
        kwargs.update(lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        super().__init__(softmax=softmax, include_background=include_background, to_onehot_y=True, **kwargs)


class FocalLoss(_LabelMapTarget, monai.losses.FocalLoss):
    """Softmax focal loss (Lin et al.; course notes): mean over voxels of -(1 - p_t)^gamma ln p_t, p_t the
    probability of the true class (MONAI's FocalLoss computes the per-channel terms).

    Reduction: MONAI's "mean" averages over batch, channels and voxels; only the true class's channel is
    non-zero, so its value is the focal loss of Lin et al. divided by the number of channels C (1/20 for
    the paper's 19 labels + background), which scales the gradients, i.e. the effective learning rate, by
    1/C and makes a learning-rate sweep incomparable with cross-entropy. We follow the source instead:
    reduction="voxel_mean" (default) sums over channels and averages over batch and voxels, so with
    gamma = 0 the loss is exactly the categorical cross-entropy. reduction="mean" or "sum" give MONAI's.
    """

    def __init__(
        self, softmax=True, include_background=True, gamma=2.0, reduction="voxel_mean", **kwargs
    ) -> None:
        self.voxel_mean = reduction == "voxel_mean"
        kwargs.update(gamma=gamma, reduction="none" if self.voxel_mean else reduction)
        super().__init__(
            use_softmax=softmax, include_background=include_background, to_onehot_y=True, **kwargs
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        loss = super().forward(input, target)  # (B, C, *spatial) with reduction "none"
        return loss.sum(dim=1).mean() if self.voxel_mean else loss


class TverskyLoss(_LabelMapTarget, monai.losses.TverskyLoss):
    """Tversky loss (Salehi et al.; course notes): E_l[1 - TP / (TP + alpha FP + beta FN)] (MONAI)."""

    def __init__(self, softmax=True, include_background=True, alpha=0.3, beta=0.7, **kwargs) -> None:
        kwargs.update(alpha=alpha, beta=beta)
        super().__init__(softmax=softmax, include_background=include_background, to_onehot_y=True, **kwargs)


# --- Written here: MONAI has no class-weighted-by-frequency, boundary-weighted or exp-log loss ------------


class WeightedCrossEntropyLoss(nn.Module):
    """Class-weighted cross-entropy (course notes, weighted loss functions): mean_i w_{y_i} (-ln p_{y_i}(i)).

    The weights are inverse to label frequency (`inverse_frequency_weights`: sum_k f_k w_k = 1). The sum is
    divided by the number of voxels (the notes' sum over pixels, averaged), not by the sum of the weights as
    torch's weighted "mean" does, so rare classes really do weigh more in every batch.

    Args:
        class_frequencies: K fractions of training voxels per class, background first (given by the
            runner); None gives unit weights, i.e. plain cross-entropy.
    """

    def __init__(self, class_frequencies: Sequence[float] | None = None) -> None:
        super().__init__()
        weight = None if class_frequencies is None else inverse_frequency_weights(class_frequencies)
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        labels = as_labels(input, target)  # (B, *spatial)
        if self.weight is not None and self.weight.numel() != input.shape[1]:
            raise ValueError(f"{self.weight.numel()} class weights for input shape {tuple(input.shape)}")
        nll = F.cross_entropy(input, labels, reduction="none")  # (B, *spatial)
        if self.weight is None:
            return nll.mean()
        return (self.weight.to(nll)[labels] * nll).mean()


BORDERS = ("all", "background")


def unet_weight_map(
    labels: np.ndarray,
    class_weights: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    border: str = "all",
):
    """U-Net weight map (Ronneberger et al. 2015, eq. 2; course notes, weighted loss functions):

        w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / (2 sigma^2)).

    Objects are the connected components (full connectivity) of every foreground label, so two touching
    structures of different labels are two objects. d1, d2 are the Euclidean distances in voxels from x to
    the border of the nearest and of the second nearest object; the distance to an object's border is the
    distance to the nearest voxel on its other side (to the object from outside it, to the outside from
    inside it). With fewer than two objects the term is 0. Objects farther than 4 sigma are skipped (their
    term would be below w0 exp(-8)).

    border: "all" (default) adds the term at every voxel, as the course notes define c_p for every pixel p
    (and U-Net eq. 2 writes it for every x); "background" adds it on background voxels only, as common
    U-Net re-implementations do (the separation borders between touching cells are background).

    Args:
        labels: (*spatial) integer label map of one image.
        class_weights: (K,) w_c per class.
        w0, sigma: the border term's amplitude and width in voxels (U-Net: 10 and 5).
        border: one of BORDERS.

    Returns:
        (*spatial) float32 weight map.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    weights = class_weights[labels].astype(np.float32)
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    margin = int(np.ceil(4 * sigma))
    for k in np.unique(labels[labels > 0]):
        components, _ = ndimage.label(labels == k, structure=structure)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            crop = tuple(
                slice(max(s.start - margin, 0), min(s.stop + margin, n))
                for s, n in zip(box, labels.shape, strict=True)
            )
            inside = components[crop] == index
            distance = ndimage.distance_transform_edt(~inside)  # outside: to the object `index`
            if border == "all":  # inside: to the nearest voxel outside it (none in the crop: infinitely far)
                own = ndimage.distance_transform_edt(inside) if not inside.all() else np.inf
                distance = np.where(inside, own, distance)
            near1, near2 = d1[crop], d2[crop]
            d2[crop] = np.where(distance < near1, near1, np.minimum(near2, distance))
            d1[crop] = np.minimum(near1, distance)
    border_term = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))  # exp(-inf) = 0 where d2 = inf
    term = border_term if border == "all" else np.where(labels == 0, border_term, 0.0)
    return weights + term.astype(np.float32)


class BoundaryWeightedCrossEntropyLoss(nn.Module):
    """Boundary-weighted cross-entropy (course notes; U-Net): mean_i w(i) (-ln p_{y_i}(i)).

    w is the U-Net weight map `unet_weight_map` of the target; by default its border term is added at every
    voxel, as the course notes define it (border="background" for the background-only variant).

    The map is computed per batch from the target label map on the CPU (scipy distance transforms).

    Args:
        class_frequencies: K training fractions per class for w_c (inverse-frequency weights as in
            WeightedCrossEntropyLoss); None or balance_classes=False gives w_c = 1.
        w0: border term amplitude (U-Net: 10).
        sigma: border term width in voxels (U-Net: 5 pixels).
        balance_classes: use class_frequencies for w_c.
        border: "all" or "background": where the border term is added (`unet_weight_map`).
    """

    def __init__(
        self,
        class_frequencies: Sequence[float] | None = None,
        w0: float = 10.0,
        sigma: float = 5.0,
        balance_classes: bool = True,
        border: str = "all",
    ) -> None:
        super().__init__()
        if border not in BORDERS:
            raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
        self.border = border
        self.balance = class_frequencies is not None and balance_classes
        self.class_weights = inverse_frequency_weights(class_frequencies).numpy() if self.balance else None
        self.w0, self.sigma = w0, sigma

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        labels = as_labels(input, target)  # (B, *spatial)
        num_classes = input.shape[1]
        class_weights = self.class_weights if self.balance else np.ones(num_classes, np.float32)
        if class_weights.size != num_classes:
            raise ValueError(f"{class_weights.size} class weights for input shape {tuple(input.shape)}")
        maps = [
            unet_weight_map(lab, class_weights, self.w0, self.sigma, self.border)
            for lab in labels.cpu().numpy()
        ]
        weight = torch.from_numpy(np.stack(maps)).to(input)  # (B, *spatial)
        return (weight * F.cross_entropy(input, labels, reduction="none")).mean()


class ExpLogLoss(nn.Module):
    """Exponential logarithmic loss, Wong et al. MICCAI 2018 (eqs. 1-4 there).

        L = w_dice E_{b,i}[(-ln Dice_bi)^gamma_dice] + w_cross E_{b,x}[w_l (-ln p_l(x))^gamma_cross]
        Dice_bi = (2 sum_x y_i(x) p_i(x) + smooth) / (sum_x (y_i(x) + p_i(x)) + smooth)
        w_l = ((sum_k f_k) / f_l)^0.5,  l = the true label at x

    The paper's defaults: w_dice = 0.8, w_cross = 0.2, gamma_dice = gamma_cross = 0.3, smooth (its epsilon,
    a pseudocount for labels missing from a sample) = 1. E_i runs over all labels, background included.

    Args:
        class_frequencies: K training fractions per class (runner); None gives w_l = 1. Absent classes are
            floored at 1e-6.
        w_dice, w_cross, gamma_dice, gamma_cross, smooth: as above.
        softmax: the input is logits (True) or already probabilities.
    """

    def __init__(
        self,
        class_frequencies: Sequence[float] | None = None,
        w_dice: float = 0.8,
        w_cross: float = 0.2,
        gamma_dice: float = 0.3,
        gamma_cross: float = 0.3,
        smooth: float = 1.0,
        softmax: bool = True,
    ) -> None:
        super().__init__()
        weight = None
        if class_frequencies is not None:
            freq = torch.as_tensor(class_frequencies, dtype=torch.float64)
            weight = (freq.sum() / freq.clamp_min(1e-6)).sqrt().float()
        self.register_buffer("label_weight", weight)
        self.w_dice, self.w_cross = w_dice, w_cross
        self.gamma_dice, self.gamma_cross = gamma_dice, gamma_cross
        self.smooth, self.softmax = smooth, softmax

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_target(input, target)
        log_p = F.log_softmax(input, dim=1) if self.softmax else input.clamp_min(TINY).log()
        truth = as_one_hot(target, input.shape[1], log_p)  # (B, C, *spatial)
        p, y = log_p.exp().flatten(2), truth.flatten(2)  # (B, C, N)
        dice = (2 * (p * y).sum(2) + self.smooth) / ((p + y).sum(2) + self.smooth)  # (B, C)
        dice_term = (-dice.log()).clamp_min(TINY).pow(self.gamma_dice).mean()
        nll = -(log_p * truth).sum(1)  # (B, *spatial): -ln p_l(x) at the true label l
        cross = nll.clamp_min(TINY).pow(self.gamma_cross)
        if self.label_weight is not None:
            if self.label_weight.numel() != input.shape[1]:
                raise ValueError(f"{self.label_weight.numel()} label weights for input {tuple(input.shape)}")
            shape = (1, -1) + (1,) * (input.ndim - 2)
            cross = cross * (truth * self.label_weight.to(truth).view(shape)).sum(1)  # (B, *spatial)
        return self.w_dice * dice_term + self.w_cross * cross.mean()
