"""NeRD's output stage, `head.output=mlp_sigmoid` (Zhang et al. Sec. 2.2: "another MLP and a Sigmoid"):
shapes, values in (0, 1), a forward worked out by hand, its place in the NeRD experiments, and how
evaluation reads sigmoid outputs (argmax for the prediction, the sigmoids themselves as soft prediction)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medexp.config.build import build_loss, build_model
from medexp.config.compose import compose_config
from medexp.config.registry import group_choices
from medexp.errors import ConfigError
from medexp.evaluation.inference import predicted_cases
from medexp.nn.heads import (
    NeRDcHead,
    NeRDmHead,
    PlainHead,
    PlainSigmoidHead,
    SigmoidMLPOutput,
    outputs_probabilities,
)
from medexp.nn.wong import WongNet

HEADS = [PlainHead, NeRDcHead, NeRDmHead]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("head_cls", HEADS)
@pytest.mark.parametrize("spatial", [(6, 5), (4, 5, 3)])
def test_sigmoid_output_shapes_range_and_backward(head_cls, spatial):
    torch.manual_seed(0)
    head = head_cls(in_channels=7, num_classes=3, spatial_dims=len(spatial), output="mlp_sigmoid")
    x = torch.randn(2, 7, *spatial, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 3, *spatial)
    assert bool((out > 0).all() and (out < 1).all())
    assert not torch.allclose(out.sum(1), torch.ones(2, *spatial))  # per-class sigmoids, not a softmax
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert outputs_probabilities(head) and not outputs_probabilities(head_cls(7, 3, len(spatial)))


def test_nerdm_with_sigmoid_output_by_hand():
    # NeRDm, C = 1 feature, K = 2 classes, on a 1 x 3 image; all weights set by hand.
    # Border distances (top, right, bottom, left) at columns j = 0, 1, 2: left = j / 2, top = bottom = 0.
    # Position MLP: h = relu(left); last layer (1/sigma, -mu/sigma) = (2 + h, -1).
    # Classifier W = [1, -1]: s = W (x / sigma - mu / sigma) = (n, -n), n = x (2 + h) - 1.
    # Output MLP: a = relu(0.5 s_0 - 0.25 s_1 + 0.1) = relu(0.75 n + 0.1); z = (a, -2 a + 1); p = sigmoid(z).
    #   j = 0: x = 1.0, h = 0.0, n = 1.0 * 2.0 - 1 = 1.0,  a = 0.85,   z = (0.85, -0.7)
    #   j = 1: x = 1.5, h = 0.5, n = 1.5 * 2.5 - 1 = 2.75, a = 2.1625, z = (2.1625, -3.325)
    #   j = 2: x = 2.0, h = 1.0, n = 2.0 * 3.0 - 1 = 5.0,  a = 3.85,   z = (3.85, -6.7)
    head = NeRDmHead(1, 2, spatial_dims=2, hidden=(1,), output="mlp_sigmoid", output_hidden=(1,))
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
        head.mlp[0].bias.zero_()
        head.mlp[2].weight.copy_(torch.tensor([[1.0], [0.0]]))
        head.mlp[2].bias.copy_(torch.tensor([2.0, -1.0]))
        head.classifier.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        first, last = head.output_stage.mlp[0], head.output_stage.mlp[2]
        first.weight.copy_(torch.tensor([0.5, -0.25]).view(1, 2, 1, 1))
        first.bias.copy_(torch.tensor([0.1]))
        last.weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
        last.bias.copy_(torch.tensor([0.0, 1.0]))
    out = head(torch.tensor([1.0, 1.5, 2.0]).view(1, 1, 1, 3))  # (1, K, 1, 3)
    z = [(0.85, -0.7), (2.1625, -3.325), (3.85, -6.7)]
    expected = torch.tensor([[sigmoid(a) for a, _ in z], [sigmoid(b) for _, b in z]]).view(1, 2, 1, 3)
    torch.testing.assert_close(out, expected)


def test_plain_sigmoid_head_is_not_bypassed_by_wongnet():
    """WongNet applies a linear plain head per decoder level (type check); the sigmoid variant is its own
    subclass, so it gets the whole features and its output stage."""
    head = PlainHead(4, 3, 3, output="mlp_sigmoid")
    assert type(head) is PlainSigmoidHead and isinstance(head.output_stage, SigmoidMLPOutput)
    assert type(PlainHead(4, 3, 3)) is PlainHead and isinstance(PlainHead(4, 3, 3).output_stage, nn.Identity)
    torch.manual_seed(0)
    sigmoid_head = lambda **kw: PlainHead(**kw, output="mlp_sigmoid")  # noqa: E731
    net = WongNet(1, 3, spatial_dims=2, channels=(4, 4, 4, 4, 4), head=sigmoid_head)
    out = net(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 3, 32, 32) and bool((out > 0).all() and (out < 1).all())


def test_unknown_output_is_refused():
    with pytest.raises(ValueError, match="head.output='softmax': expected one of linear, mlp_sigmoid"):
        NeRDcHead(4, 2, 2, output="softmax")
    with pytest.raises(ConfigError, match="mlp_sigmoid"):
        cfg = compose_config(["experiment=nerd", "head.output=softmax"])
        build_model(cfg, in_channels=1, num_classes=2, spatial_dims=2)


NERD = [e for e in group_choices("experiment") if e.startswith("nerd")]


@pytest.mark.parametrize("experiment", NERD)
def test_nerd_experiments_use_the_sigmoid_output_and_a_probability_loss(experiment):
    cfg = compose_config([f"experiment={experiment}", "model.channels=[4,4,4,4,4]"])
    assert cfg.head.output == "mlp_sigmoid" and cfg.loss.softmax is False and cfg.loss.include_background
    model = build_model(cfg, in_channels=2, num_classes=2, spatial_dims=2)
    assert outputs_probabilities(model)
    out = model(torch.randn(1, 2, 32, 32))
    assert bool((out > 0).all() and (out < 1).all())
    loss = build_loss(cfg)
    target = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    target[..., 8:16, 8:16] = 1
    # soft Dice on the probabilities as they are (no softmax), both channels: by the formula
    p = out.detach()
    y = torch.cat([1 - target, target], dim=1).float()
    inter, total = (p * y).sum((2, 3)), (p + y).sum((2, 3))
    expected = (1 - (2 * inter + 1e-5) / (total + 1e-5)).mean()
    torch.testing.assert_close(loss(p, target), expected)


@pytest.mark.parametrize("experiment", NERD)
def test_nerd_baseline_and_a_logits_loss(experiment):
    """head=plain (the U-Net baseline) gets the same output stage; loss=ce, which has no probability form,
    is refused in one line rather than applying a softmax to probabilities."""
    cfg = compose_config([f"experiment={experiment}", "head=plain"])
    assert cfg.head.output == "mlp_sigmoid"
    with pytest.raises(ConfigError, match="softmax"):
        build_loss(compose_config([f"experiment={experiment}", "loss=ce"]))


def test_evaluation_reads_sigmoid_outputs_as_they_are():
    """Prediction = argmax over the class sigmoids; soft prediction = the sigmoids (no softmax on them)."""

    class Fixed(nn.Module):
        def __init__(self, out: torch.Tensor, sigmoid: bool) -> None:
            super().__init__()
            self.out = out
            self.stage = SigmoidMLPOutput(2, 2) if sigmoid else nn.Identity()  # only marks the kind

        def forward(self, image):
            return self.out

    probs = torch.tensor([[0.9, 0.2], [0.3, 0.4]]).view(1, 2, 1, 2)  # class 0 / 1 at two pixels
    batch = {"image": torch.zeros(1, 1, 1, 2), "label": torch.zeros(1, 1, 1, 2), "id": ["a"]}
    (case,) = predicted_cases(Fixed(probs, True), [batch], (1, 2), torch.device("cpu"), with_scores=True)
    assert case.prediction.flatten().tolist() == [0, 1]
    torch.testing.assert_close(case.scores, probs)
    (case,) = predicted_cases(Fixed(probs, False), [batch], (1, 2), torch.device("cpu"), with_scores=True)
    torch.testing.assert_close(case.scores, torch.softmax(probs, dim=1))  # logits: softmax (control)
