"""Wong & Moradi Fig. 1(b): L_PCC and L_Dice while simulated scores move from random to perfect.

A size^3 image (100^3 in the paper) holds a centred cubic object of side m. At step t of T, with
s = t / (T - 1) going from 0 to 1, the object's scores are drawn from N(0.5 + 0.5 s, (0.5 (1 - s))^2) and the
background's from N(0.5 - 0.5 s, (0.5 (1 - s))^2), clipped to [0, 1]: from N(0.5, 0.5^2) to N(1, 0) and to
N(0, 0), i.e. from totally random to perfect scores. The x axis is the object's mean score 0.5 + 0.5 s.

L_PCC: medexp.losses.PCCLoss(softmax=False) on the two-channel score volume [1 - p, p] against the label map,
i.e. eq. 4 with E over both labels of the binary problem. Both labels give the same r (1 - p and 1 - y are p
and y negated and shifted, which leaves a correlation unchanged), so this also equals the object label's
1 - PCC alone.
L_Dice: eq. 5 for the object label, 1 - (2 sum p y + eps) / (sum (p + y) + eps), eps = 1e-7: the label the
figure is about (the background's Dice is near 1 for every m).

Usage:
    python scripts/pcc_vs_dice.py [--steps 51] [--size 100] [--m 5 10 20 50] [--seed 0]
                                  [--out outputs/pcc_vs_dice.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medexp.losses import PCCLoss  # noqa: E402

EPS = 1e-7  # eq. 5's epsilon


def cube_labels(size: int, m: int) -> np.ndarray:
    """(size, size, size) 0/1 label map with a centred cube of side m."""
    if not 0 < m <= size:
        raise ValueError(f"object side m={m} must be in 1..size={size}")
    labels = np.zeros((size,) * 3, dtype=np.int64)
    lo = (size - m) // 2
    labels[lo : lo + m, lo : lo + m, lo : lo + m] = 1
    return labels


def simulated_scores(labels: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Object ~ N(0.5 + 0.5 s, (0.5 (1 - s))^2), background ~ N(0.5 - 0.5 s, same), clipped to [0, 1]."""
    mean = np.where(labels == 1, 0.5 + 0.5 * s, 0.5 - 0.5 * s)
    return np.clip(mean + 0.5 * (1.0 - s) * rng.standard_normal(labels.shape), 0.0, 1.0)


def dice_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Eq. 5 for one label: 1 - (2 sum p y + eps) / (sum (p + y) + eps)."""
    return float(1.0 - (2.0 * np.sum(p * y) + EPS) / (np.sum(p) + np.sum(y) + EPS))


def simulate(size: int, m: int, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Mean object score, L_PCC and L_Dice at each of `steps` simulated training steps."""
    labels = cube_labels(size, m)
    target = torch.from_numpy(labels)[None, None]  # (1, 1, D, H, W)
    pcc = PCCLoss(softmax=False, include_background=True, eps=EPS)
    progress = np.linspace(0.0, 1.0, steps)
    out = {"score": 0.5 + 0.5 * progress, "pcc": np.zeros(steps), "dice": np.zeros(steps)}
    for t, s in enumerate(progress):
        p = simulated_scores(labels, s, rng)
        scores = torch.from_numpy(np.stack([1.0 - p, p]))[None]  # (1, 2, D, H, W)
        out["pcc"][t] = float(pcc(scores, target))
        out["dice"][t] = dice_loss(p, labels)
    return out


def plot(results: dict[int, dict[str, np.ndarray]], path: Path) -> None:
    """Two panels like Fig. 1(b): L_PCC and L_Dice against the mean object score, one curve per m."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for m, curves in results.items():
        axes[0].plot(curves["score"], curves["pcc"], label=f"m = {m}")
        axes[1].plot(curves["score"], curves["dice"], label=f"m = {m}")
    for ax, name in zip(axes, ("$L_{PCC}$", "$L_{Dice}$"), strict=True):
        ax.set_title(name)
        ax.set_xlabel("simulated training progress (mean object score)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[int, dict[str, np.ndarray]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=51, help="simulated training steps (>= 2)")
    parser.add_argument("--size", type=int, default=100, help="image side in voxels (paper: 100)")
    parser.add_argument("--m", type=int, nargs="+", default=[5, 10, 20, 50], help="object sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/pcc_vs_dice.png"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if any(not 0 < m <= args.size for m in args.m):
        parser.error(f"--m {args.m}: every object side must be in 1..--size ({args.size})")
    rng = np.random.default_rng(args.seed)
    results = {m: simulate(args.size, m, args.steps, rng) for m in args.m}
    for m, c in results.items():
        print(
            f"m={m} pcc_first={c['pcc'][0]:.4f} pcc_last={c['pcc'][-1]:.4f} "
            f"dice_first={c['dice'][0]:.4f} dice_last={c['dice'][-1]:.4f}"
        )
    plot(results, args.out)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
