"""The pre-registered rules of the claims study (conf/experiment/study_claims.yaml, docs/results.md):
convergence of a run from its validation curve, and the verdict on each claim from the runs table.

A row of the runs table (docs/results/runs.csv) is one run: kernel, loss, lr, split, status, test_dice
(mean over labels, as a fraction), val_curve (the validation Dice of every epoch, ';'-separated), and
more columns that the page shows but the rules do not read. The rules are written here once; the page,
its test and anyone auditing the table use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

HOLDS, FAILS, NOT_TESTED = "holds", "does not hold", "not tested"
WINDOW = 10  # epochs per window of the convergence rule
CONVERGENCE_PP = 1.0  # a run still gaining this much (pp) between the last two windows is unconverged
CLAIM_A_MARGIN_PP = 5.0  # the mean Dice-minus-PCC drop must exceed this
CLAIM_B_TOLERANCE_PP = 2.0  # |mixed - conventional| under PCC within this
LOW_LR, HIGH_LR, TABLE_LR = 1e-3, 1e-2, 1e-3
SPLITS = (0, 1, 2)  # the pre-registered splits


@dataclass
class Verdict:
    """A claim's outcome, the numbers it rests on (pp) and why a claim was not tested."""

    claim: str
    outcome: str
    numbers: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def parse_curve(text: str) -> list[float]:
    """The validation curve stored as 'v1;v2;...' (NaN where an epoch was not validated)."""
    return [float(v) for v in text.split(";") if v != ""] if text else []


def best_epoch(curve: Sequence[float]) -> int | None:
    """The epoch (1-based) whose checkpoint the run keeps: the first strict maximum of validation Dice, as
    the training loop keeps best.pt (a later epoch must beat it)."""
    finite = [(v, -i) for i, v in enumerate(curve) if math.isfinite(v)]
    return -max(finite)[1] + 1 if finite else None


def is_converged(curve: Sequence[float], window: int = WINDOW, tol_pp: float = CONVERGENCE_PP) -> bool | None:
    """False when the mean validation Dice of the last `window` epochs exceeds that of the `window` before
    them by `tol_pp` percentage points or more; None when the curve is too short to tell."""
    values = [v for v in curve if math.isfinite(v)]
    if len(values) < 2 * window:
        return None
    last, before = values[-window:], values[-2 * window : -window]
    gain_pp = 100 * (sum(last) / window - sum(before) / window)
    return round(gain_pp, 9) < tol_pp  # rounded: a gain of exactly 1 pp must not read as 0.9999999


def _same_lr(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _usable(row: dict) -> bool:
    """A run counts when it finished, has a test Dice and is converged."""
    converged = row.get("converged")
    return (
        row.get("status") == "FINISHED"
        and math.isfinite(float(row.get("test_dice", "nan") or "nan"))
        and str(converged).lower() == "true"
    )


def _dice(rows: list[dict], kernel: str, loss: str, lr: float, split: int, missing: list[str]) -> float:
    """Test Dice (pp) of one cell and split; NaN (and a note in `missing`) when the run does not count."""
    found = [
        r for r in rows
        if r["kernel"] == kernel and r["loss"] == loss and _same_lr(float(r["lr"]), lr)
        and int(r["split"]) == split
    ]  # fmt: skip
    name = f"{kernel}/{loss}/lr{lr:g}/split{split}"
    if not found:
        missing.append(f"{name}: no run")
        return math.nan
    row = found[-1]
    if not _usable(row):
        why = row.get("status") if row.get("status") != "FINISHED" else "unconverged or no test Dice"
        missing.append(f"{name}: {why}")
        return math.nan
    return 100 * float(row["test_dice"])


def claim_a(rows: list[dict], splits: Sequence[int]) -> Verdict:
    """Claim A (Fig. 3): per split, drop = Dice at 1e-3 - Dice at 1e-2 (conventional kernels). Holds if the
    Dice loss drops more than PCC in every split and by more than 5 pp on average over splits."""
    missing: list[str] = []
    gaps = []
    for s in splits:
        drop = {
            loss: _dice(rows, "conventional", loss, LOW_LR, s, missing)
            - _dice(rows, "conventional", loss, HIGH_LR, s, missing)
            for loss in ("dice", "pcc")
        }
        gaps.append(drop["dice"] - drop["pcc"])
    if missing:
        return Verdict("A", NOT_TESTED, missing=missing)
    mean_gap = sum(gaps) / len(gaps)
    numbers = {f"gap_split{s}": g for s, g in zip(splits, gaps, strict=True)} | {"mean_gap": mean_gap}
    holds = all(g > 0 for g in gaps) and mean_gap > CLAIM_A_MARGIN_PP
    return Verdict("A", HOLDS if holds else FAILS, numbers)


def claim_b(rows: list[dict], splits: Sequence[int]) -> Verdict:
    """Claim B (Table 1): mixed vs conventional at lr 1e-3. Holds if the mean over splits of the paired
    difference under PCC is within 2 pp; the Dice-loss difference is reported alongside, not judged."""
    missing: list[str] = []
    diffs = {
        loss: [
            _dice(rows, "mixed", loss, TABLE_LR, s, missing)
            - _dice(rows, "conventional", loss, TABLE_LR, s, missing)
            for s in splits
        ]
        for loss in ("pcc", "dice")
    }
    pcc_missing = [m for m in missing if "/pcc/" in m]
    numbers = {
        f"mean_diff_{loss}": sum(d) / len(d) for loss, d in diffs.items() if all(math.isfinite(v) for v in d)
    }
    if pcc_missing:
        return Verdict("B", NOT_TESTED, numbers, missing=pcc_missing)
    holds = abs(numbers["mean_diff_pcc"]) <= CLAIM_B_TOLERANCE_PP
    return Verdict("B", HOLDS if holds else FAILS, numbers, missing=missing)
