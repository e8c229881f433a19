"""scripts/pcc_vs_dice.py: the Fig. 1(b) simulation of Wong & Moradi, on a small image."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medexp.losses import PCCLoss

SCRIPT = Path(__file__).parents[1] / "scripts" / "pcc_vs_dice.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pcc_vs_dice", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulation_matches_the_paper(script, tmp_path, capsys):
    out = tmp_path / "fig.png"
    results = script.main(
        ["--size", "40", "--steps", "5", "--m", "5", "10", "20", "--seed", "1", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 0
    for m in (5, 10, 20):
        assert re.search(rf"^m={m} pcc_first=\S+ pcc_last=\S+ dice_first=\S+ dice_last=\S+$", printed, re.M)
        # "regardless of the object size, L_PCC consistently starts at 0.5 and ends at 0"
        assert results[m]["pcc"][0] == pytest.approx(0.5, abs=0.02)
        assert results[m]["pcc"][-1] == pytest.approx(0.0, abs=1e-6)
        assert results[m]["dice"][-1] == pytest.approx(0.0, abs=1e-6)
    # "whereas the starting value of L_Dice depends on the object size": random scores give
    # Dice ~ 2 * 0.5 m^3 / (0.5 N + m^3), so a larger object starts lower (40^3: 0.996, 0.970, 0.800).
    starts = [results[m]["dice"][0] for m in (5, 10, 20)]
    assert starts[0] > starts[1] > starts[2]
    assert starts == pytest.approx([1 - 125 / 32125, 1 - 1000 / 33000, 1 - 8000 / 40000], abs=0.01)


def test_two_channel_pcc_is_eq4_for_the_binary_problem(script):
    rng = np.random.default_rng(0)
    labels = script.cube_labels(12, 4)
    p = script.simulated_scores(labels, 0.3, rng)
    scores = torch.from_numpy(np.stack([1 - p, p]))[None]  # (1, 2, D, H, W)
    loss = PCCLoss(softmax=False)(scores, torch.from_numpy(labels)[None, None]).item()
    r = np.corrcoef(p.ravel(), labels.ravel())[0, 1]  # Pearson's r of the object label (eq. 3)
    assert loss == pytest.approx(1 - 0.5 * (r + 1), abs=1e-6)


def test_rejects_object_larger_than_image(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--size", "10", "--m", "20", "--out", str(tmp_path / "x.png")])
