"""The no-learning floor (medexp.evaluation.floor): the training cases' per-voxel majority label, scored as
a prediction with the model's own evaluation. Expected values worked out by hand on 2 x 2 maps."""

from __future__ import annotations

import math

import pytest
import torch

from medexp.evaluation.floor import TemplatePredictor, majority_template
from medexp.evaluation.inference import evaluate
from medexp.evaluation.summary import foreground_means


def _maps(*grids) -> list[torch.Tensor]:
    """Each 2 x 2 grid as a label batch (1, 1, 2, 2)."""
    return [torch.tensor(g, dtype=torch.uint8)[None, None] for g in grids]


def test_majority_per_voxel_ignoring_the_ignore_value():
    # voxel by voxel: (0,1,0,255) -> 0; (1,1,1,1) -> 1; (1,2,2,255) -> 2; (2,2,0,0) -> tie 2:2 -> 0
    labels = _maps([[0, 1], [1, 2]], [[1, 1], [2, 2]], [[0, 1], [2, 0]], [[255, 1], [255, 0]])
    template = majority_template(labels, num_classes=3)
    assert template.tolist() == [[0, 1], [2, 0]]


def test_cases_of_different_shapes_have_no_floor():
    with pytest.raises(ValueError, match="one shape"):
        majority_template([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 2)], num_classes=2)


def test_floor_is_scored_like_a_model():
    template = majority_template(_maps([[0, 1], [2, 2]], [[0, 1], [2, 2]], [[1, 1], [0, 2]]), 3)
    assert template.tolist() == [[0, 1], [2, 2]]
    truth = torch.tensor([[1, 1], [2, 0]], dtype=torch.uint8)[None, None]
    loader = [{"image": torch.zeros(1, 1, 2, 2), "label": truth, "id": ["case0"]}]
    table = evaluate(
        TemplatePredictor(template, 3), loader, num_classes=3, roi_size=[2, 2], device=torch.device("cpu")
    )
    # label 1: predicted {(0,1)}, true {(0,0),(0,1)}: 2*1/(1+2)
    # label 2: predicted {(1,0),(1,1)}, true {(1,0)}: 2*1/(2+1)
    means = foreground_means(table.values, ["bg", "a", "b"], "floor")
    assert math.isclose(means["floor/dice/a"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(means["floor/dice/b"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(means["floor/dice_mean"], 2 / 3, rel_tol=1e-6)


def test_template_predictor_refuses_another_shape():
    with pytest.raises(ValueError, match="template has shape"):
        TemplatePredictor(torch.zeros(2, 2), 2)(torch.zeros(1, 1, 3, 3))
