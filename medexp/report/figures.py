"""The report's Fig. 3 analogue (test Dice against learning rate), drawn with matplotlib's object-oriented API
on the Agg canvas (no pyplot, no display)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

DPI = 110


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def dice_vs_lr(panels: dict[str, dict[str, list[tuple]]], path: str | Path, title: str = "") -> Path:
    """Fig. 3 analogue: mean test Dice against log10 learning rate, a panel per kernel, a line per loss.

    Args:
        panels: {kernel: {line name: [(lr, mean, std, n_diverged), ...]}}; std NaN (one split) draws no bar.
            A line keeps its colour in every panel; points whose runs include diverged ones get a red cross.
    """
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 4.0), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), sharex=True, sharey=True, squeeze=False)[0]
    names = list(dict.fromkeys(name for lines in panels.values() for name in lines))
    all_x = sorted({math.log10(p[0]) for lines in panels.values() for line in lines.values() for p in line})
    top = 0.0
    for ax, (kernel, lines) in zip(axes, panels.items(), strict=False):
        for name, line in lines.items():
            x = [math.log10(p[0]) for p in line]
            y = [p[1] for p in line]
            err = [p[2] if math.isfinite(p[2]) else 0.0 for p in line]
            colour = f"C{names.index(name) % 10}"
            ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=3, color=colour, label=name)
            crosses = [(xi, yi) for xi, yi, p in zip(x, y, line, strict=True) if p[3]]
            if crosses:
                ax.plot(
                    *zip(*crosses, strict=True),
                    "x",
                    color="red",
                    markersize=9,
                    label=f"{name}: diverged runs",
                )
            top = max([top, *(yi + e for yi, e in zip(y, err, strict=True) if math.isfinite(yi))])
        ax.set_title(kernel)
        ax.set_xlabel("log10 learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_xticks(all_x, [f"{v:.3g}" for v in all_x])
    if all_x:
        axes[0].set_xlim(all_x[0] - 0.25, all_x[-1] + 0.25)
    axes[0].set_ylabel("test Dice (mean over labels)")
    axes[0].set_ylim(0, min(1.0, max(top * 1.1, 0.05)))
    fig.suptitle(
        "Test Dice vs learning rate (cf. Wong & Moradi 2022, Fig. 3)" + (f"\n{title}" if title else "")
    )
    return save_figure(fig, path)
