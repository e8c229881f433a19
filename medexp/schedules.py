"""Learning-rate schedules that need the run's length (torch has the mechanics, not these settings)."""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import MultiStepLR


def halving(
    optimizer: Optimizer, max_epochs: int, fractions: Sequence[float] = (0.5, 0.7, 0.9), gamma: float = 0.5
) -> MultiStepLR:
    """The NeRD paper's schedule: lr multiplied by `gamma` (halved) at 50%, 70% and 90% of training.

    Args:
        optimizer: the optimizer to schedule (stepped once per epoch).
        max_epochs: total epochs of the run.
        fractions: where in training the drops happen.
        gamma: factor per drop.
    """
    milestones = sorted({max(1, round(f * max_epochs)) for f in fractions})
    return MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
