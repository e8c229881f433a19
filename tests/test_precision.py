"""Mixed precision: trainer.precision=bf16 runs on CPU too, and a bfloat16 autocast training step of every
kernel x head x input_layer combination matches the float32 one.

Tolerance. bfloat16 keeps 8 significant bits, so its unit roundoff is u = 2^-8 (0.39%): one rounding of a
value is off by at most u/2 relatively. Under autocast the convolutions and matmuls round their operands and
outputs to bfloat16 (with float32 accumulation), the Gabor layers and the FFT input stage compute in float32
islands, and the trainer evaluates the loss in float32 from the logits. Along the network's longest path
(about 15 convolutions) the relative errors of the logits add up like a random walk, sqrt(15) u/2 ~ 2u, and
GroupNorm rescales every layer, so they do not compound. The PCC loss is a mean of correlations in [-1, 1],
i.e. of bounded, scale-free functions of the softmax outputs; a relative perturbation e of the logits moves
it by at most ~e. So we require |L_bf16 - L_fp32| <= 4u L_fp32 = 2^-6 L_fp32 (1.6%), twice that estimate.
(Seen: at most 0.06u.) The dropout masks are the same in both runs (same seed), so the difference is the
numerics alone.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from medexp.losses import PCCLoss
from medexp.nn.fft import FFTInput
from medexp.nn.heads import NeRDcHead, NeRDmHead, PlainHead
from medexp.nn.kernels import ConventionalKernels, GaborKernels, MixedKernels
from medexp.nn.wong import WongNet
from medexp.run.dist import DistContext
from medexp.run.steps import numerics, train_epoch

U_BF16 = 2.0**-8
TOLERANCE = 4 * U_BF16  # relative, worked out in the module docstring
CPU = torch.device("cpu")
# The paper's depth (1, 2, 3, 3, 3 convs per level), narrower: what is tested is the numerics of each layer
# kind, not the widths.
NARROW = dict(channels=(4, 8, 8, 8, 8))
KERNELS = {"conventional": ConventionalKernels, "mixed": MixedKernels, "gabor": GaborKernels}
HEADS = {"plain": PlainHead, "nerdc": NeRDcHead, "nerdm": NeRDmHead}
INPUTS = {"none": None, "fft": FFTInput}


class _Bar:
    def step(self, loss: float) -> None:
        pass


def _step_loss(net: torch.nn.Module, batch: dict, precision: str) -> tuple[float, torch.nn.Module]:
    """The loss of one train_epoch over one batch (computed before the optimiser step), as the trainer runs
    it: numerics(precision) on CPU, PCC loss, Nadam."""
    steps = numerics(precision, channels_last=True, spatial_dims=3, device=CPU)
    net = net.to(memory_format=steps.memory_format)
    optimizer = torch.optim.NAdam(net.parameters(), lr=1e-3)
    torch.manual_seed(7)  # the same dropout masks in both precisions
    loss = train_epoch(net, [batch], PCCLoss(), optimizer, steps, DistContext(), _Bar())
    return loss, net


@pytest.fixture(scope="module")
def batch() -> dict:
    torch.manual_seed(0)
    return {"image": torch.randn(1, 1, 16, 16, 16), "label": torch.randint(0, 3, (1, 1, 16, 16, 16))}


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel,head,input_layer",
    COMBINATIONS := list(itertools.product(KERNELS, HEADS, INPUTS)),
    ids=["-".join(c) for c in COMBINATIONS],
)
def test_bf16_training_step_matches_float32(batch, kernel, head, input_layer):
    torch.manual_seed(1)
    net = WongNet(1, 3, kernel=KERNELS[kernel](), head=HEADS[head], input_layer=INPUTS[input_layer], **NARROW)
    loss32, _ = _step_loss(copy.deepcopy(net), batch, "32")
    loss16, stepped = _step_loss(copy.deepcopy(net), batch, "bf16")
    assert abs(loss16 - loss32) <= TOLERANCE * loss32, (loss32, loss16)
    for name, p in stepped.named_parameters():  # the step went through: finite weights, in float32
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name


def test_numerics_autocast_per_precision_and_device():
    with numerics("bf16", True, 3, CPU).autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with numerics("fp16", True, 3, CPU).autocast():  # float16 autocasts on CUDA only
        assert not torch.is_autocast_enabled("cpu")
    with numerics("32", True, 3, CPU).autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert not numerics("bf16", True, 3, CPU).scaler.is_enabled()  # bf16 has float32's exponent range


@pytest.mark.parametrize("dims", [2, 3])
def test_fft_input_is_a_float32_island(dims):
    """Under bf16 autocast the FFT stage computes exactly what it computes in float32 (autocast off inside,
    float32 in and out): complex tensors have no bfloat16 type."""
    torch.manual_seed(0)
    stage = FFTInput(in_channels=2, spatial_dims=dims)
    with torch.no_grad():
        stage.conv.weight.normal_(0, 0.3)  # away from the identity initialisation
    x = torch.randn(2, 2, *([8] * dims), requires_grad=True)
    expected = stage(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stage(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and stage.conv.weight.grad is not None
