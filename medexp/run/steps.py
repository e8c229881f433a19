"""What one epoch does: the training pass over the loader, with the numerics settings it runs under."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medexp.run.dist import DistContext, all_finite


@dataclass
class Numerics:
    """How training steps run: autocast context factory, gradient scaler, activations' memory format."""

    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler
    memory_format: torch.memory_format


def numerics(
    precision: str, channels_last: bool, spatial_dims: int, device: torch.device, fixed_shapes: bool = False
) -> Numerics:
    """trainer.precision and trainer.channels_last as a Numerics.

    "bf16" autocasts to bfloat16 on CUDA and on CPU (torch.autocast("cpu") runs convolutions and matmuls in
    bfloat16 there too, so the mixed-precision numerics are testable without a GPU); "fp16" autocasts on
    CUDA only, with a gradient scaler (float16's 5 exponent bits underflow small gradients), and runs in
    float32 elsewhere. With `fixed_shapes` (every training batch has the same shape, as with a fixed
    dataset.shape) cuDNN benchmarks its convolution algorithms once per shape on CUDA.
    """
    use = (precision == "bf16" and device.type in ("cuda", "cpu")) or (
        precision == "fp16" and device.type == "cuda"
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use and precision == "fp16")
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if use else contextlib.nullcontext
    if device.type == "cuda" and fixed_shapes:
        torch.backends.cudnn.benchmark = True
    return Numerics(autocast, scaler, memory_format(channels_last, spatial_dims))


def memory_format(channels_last: bool, spatial_dims: int) -> torch.memory_format:
    """channels-last (3D or 2D) when asked, else contiguous."""
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def train_epoch(
    net,
    loader,
    loss_fn,
    optimizer,
    numerics: Numerics,
    ctx: DistContext,
    bar,
    augment: Callable | None = None,
) -> float:
    """One pass over the training loader; the mean loss, or NaN as soon as a step's loss is not finite.

    Under DDP the ranks first agree whether the step's loss is finite on every rank (one all-reduce of a
    flag, `dist.all_finite`), and all return NaN together: a rank leaving before backward while the others
    enter backward's gradient all-reduce would leave the collectives unmatched, and the job hanging.

    `augment` (images, labels) -> (images, labels) runs on the batch once it is on the device
    (trainer.augment_on_device; medexp.data.loaders.DeviceAugment). The network runs under the autocast of
    `numerics`; the loss is computed outside it, in float32 from the logits, as PyTorch's AMP recipe has it
    (reductions over a whole volume in bfloat16 would keep ~3 significant digits).
    """
    net.train()
    total, count = 0.0, 0
    for batch in loader:
        # Plain tensors: MONAI's MetaTensor tracks metadata through every op of the network (a tenth of a
        # 32^3 training step) and stops torch.compile from tracing it.
        image = batch["image"].as_subclass(torch.Tensor).to(ctx.device, non_blocking=True)  # (B, C, *S)
        label = batch["label"].as_subclass(torch.Tensor).to(ctx.device, non_blocking=True)  # (B, 1, *S)
        if augment is not None:
            image, label = augment(image, label)
        image = image.contiguous(memory_format=numerics.memory_format)
        optimizer.zero_grad(set_to_none=True)
        with numerics.autocast():
            logits = net(image)  # (B, K, *S)
        loss = loss_fn(logits.float(), label)
        if not all_finite(loss, ctx):
            return math.nan
        numerics.scaler.scale(loss).backward()
        numerics.scaler.step(optimizer)
        numerics.scaler.update()
        total += loss.item()
        count += 1
        bar.step(loss.item())
    return total / max(count, 1)


def ranks_in_sync(model: torch.nn.Module, ctx: DistContext) -> bool:
    """True when every rank ends with the same weights (a checksum compared across ranks)."""
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    if not ctx.distributed:
        return True
    sums = [None] * ctx.world_size
    torch.distributed.all_gather_object(sums, checksum)
    return all(s == sums[0] for s in sums)
