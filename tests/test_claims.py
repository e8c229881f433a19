"""The pre-registered rules of the claims study (medexp.report.claims), on hand-made runs tables whose
verdicts were worked out by hand, and on the committed docs/results/runs.csv against docs/results.md."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest

from medexp.report.claims import FAILS, HOLDS, NOT_TESTED, best_epoch, claim_a, claim_b, is_converged

ROOT = Path(__file__).resolve().parents[1]
FLAT = ";".join(["0.5"] * 20)  # a converged validation curve


def _row(kernel, loss, lr, split, dice, converged=True, status="FINISHED"):
    return {
        "kernel": kernel, "loss": loss, "lr": str(lr), "split": str(split), "status": status,
        "test_dice": str(dice / 100), "converged": str(converged).lower(), "val_curve": FLAT,
    }  # fmt: skip


def _claim_a_rows(dice_drops, pcc_drops, unconverged=()):
    """Conventional runs at 1e-3 (80% Dice) and 1e-2 (80% minus each split's drop) for both losses;
    `unconverged`: (loss, lr, split) of runs whose curve did not converge."""
    rows = []
    for s, (d, p) in enumerate(zip(dice_drops, pcc_drops, strict=True)):
        rows += [_row("conventional", "dice", 1e-3, s, 80), _row("conventional", "dice", 1e-2, s, 80 - d)]
        rows += [_row("conventional", "pcc", 1e-3, s, 80), _row("conventional", "pcc", 1e-2, s, 80 - p)]
    for r in rows:
        if (r["loss"], float(r["lr"]), int(r["split"])) in unconverged:
            r["converged"] = "false"
    return rows


def test_claim_a_holds_when_dice_drops_more_in_every_split_and_by_over_5pp():
    # gaps 20-5=15, 15-4=11, 12-3=9: all > 0, mean 35/3 = 11.67 > 5
    verdict = claim_a(_claim_a_rows([20, 15, 12], [5, 4, 3]), [0, 1, 2])
    assert verdict.outcome == HOLDS
    assert math.isclose(verdict.numbers["mean_gap"], 35 / 3, rel_tol=1e-9)


def test_claim_a_fails_when_one_split_goes_the_other_way_or_the_mean_is_small():
    # split 2: Dice drops 2, PCC 3 -> gap -1 (mean (15+11-1)/3 = 8.3 > 5 but not every split)
    assert claim_a(_claim_a_rows([20, 15, 2], [5, 4, 3]), [0, 1, 2]).outcome == FAILS
    # gaps 4, 4, 4: every split positive, mean 4 <= 5
    assert claim_a(_claim_a_rows([9, 9, 9], [5, 5, 5]), [0, 1, 2]).outcome == FAILS


def test_claim_a_is_not_tested_with_an_unconverged_or_missing_run():
    verdict = claim_a(_claim_a_rows([20, 15, 12], [5, 4, 3], unconverged=[("pcc", 1e-2, 1)]), [0, 1, 2])
    assert verdict.outcome == NOT_TESTED and verdict.missing == [
        "conventional/pcc/lr0.01/split1: unconverged or no test Dice"
    ]
    rows = [r for r in _claim_a_rows([20, 15, 12], [5, 4, 3]) if r["split"] != "2"]
    assert claim_a(rows, [0, 1, 2]).outcome == NOT_TESTED


def test_claim_b_within_2pp_under_pcc():
    def rows(mixed_pcc):
        out = []
        for s in range(3):
            out += [_row("conventional", "pcc", 1e-3, s, 70), _row("mixed", "pcc", 1e-3, s, mixed_pcc[s])]
            out += [_row("conventional", "dice", 1e-3, s, 60), _row("mixed", "dice", 1e-3, s, 50)]
        return out

    held = claim_b(rows([69, 71, 67.5]), [0, 1, 2])  # diffs -1, +1, -2.5: mean -2.5/3 = -0.83
    assert held.outcome == HOLDS and math.isclose(held.numbers["mean_diff_pcc"], -2.5 / 3, rel_tol=1e-9)
    assert math.isclose(held.numbers["mean_diff_dice"], -10.0, rel_tol=1e-9)  # reported, not judged
    assert claim_b(rows([67, 68, 67]), [0, 1, 2]).outcome == FAILS  # mean -8/3 = -2.67


def test_convergence_rule_and_best_epoch():
    rising = [0.5] * 10 + [0.51] * 10  # last window 1.0 pp above the one before: unconverged
    assert is_converged(rising) is False
    assert is_converged([0.5] * 10 + [0.5099] * 10) is True  # 0.99 pp
    assert is_converged([0.5] * 19) is None  # too short to tell
    assert best_epoch([0.1, 0.3, 0.3, 0.2]) == 2  # the first maximum, as best.pt is kept
    assert best_epoch([float("nan"), 0.1]) == 2


RUNS = ROOT / "docs" / "results" / "runs.csv"
PAGE = ROOT / "docs" / "results.md"


def test_the_committed_page_states_the_verdicts_that_the_committed_runs_give():
    """The rule applied here to docs/results/runs.csv gives the verdicts docs/results.md states."""
    with RUNS.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # the page's converged column must itself follow from the stored curve
        stored = row["converged"].lower()
        computed = is_converged([float(v) for v in row["val_curve"].split(";") if v])
        assert stored == str(computed).lower(), row["run_id"]
    splits = sorted({int(r["split"]) for r in rows})
    page = PAGE.read_text()
    for verdict in (claim_a(rows, splits), claim_b(rows, splits)):
        stated = re.search(rf"\*\*Claim {verdict.claim}\*\*: \*\*([a-z ]+)\*\*", page)
        assert stated, f"docs/results.md states no verdict for claim {verdict.claim}"
        assert stated.group(1) == verdict.outcome


@pytest.mark.parametrize("path", [PAGE])
def test_the_page_names_no_machine_path(path):
    assert not re.search(r"(/work/|/home/|/tmp/|sqlite:////)", path.read_text())
