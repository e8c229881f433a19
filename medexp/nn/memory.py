"""Counting what a training step needs, without running it at full size: bytes alive, bytes saved for
backward, FLOPs, memory traffic and the number of operations; and from them an estimated GPU step time.

Used by scripts/bench_memory.py (docs/performance.md §8); in the package for the commands that size
patches and batches to a GPU memory budget. Everything here works on the "meta" device (tensors with
shapes and no data), so a 128^3 step of any model is counted in seconds and without memory, and on real
CPU or CUDA tensors alike. It imports torch only: the components layer, with the rest of medexp.nn
(docs/design.md §2).

- `LiveBytes`: a TorchDispatchMode that sees every tensor an operation creates and follows its storage
  until it is freed (weakref on the storage), so `peak` is the high-water mark of bytes in tensors
  created inside the mode: what `torch.cuda.max_memory_allocated` would show less the caching allocator's
  rounding and library workspaces (cuDNN). It also sums, per operation that is not a view, the bytes of
  its tensor inputs and outputs (`traffic`, a lower bound on memory traffic: no re-reads) and counts
  operations (`ops`).
- `saved_bytes`: bytes that autograd saves for backward during a forward, by saved-tensor hooks, each
  storage once, parameters left out (they are counted as parameters).
- `FlopCounterMode` (torch.utils.flop_counter) counts 2 x the multiply-adds of convolutions and matmuls,
  forward and backward; norms, activations, interpolation and FFTs are not counted.

PyTorch has no public tool for the first two on the meta device (torch.cuda's counters need a GPU, the
profiler's memory view real tensors), hence the few lines here.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


class LiveBytes(TorchDispatchMode):
    """Bytes alive in tensors created under the mode (`current`, `peak`), memory traffic and op count."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # storage address -> bytes
        self.current = self.peak = self.traffic = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        self.ops += 1
        if not func._schema.is_mutable and _is_view(func, args, outputs):
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        self.traffic += sum(t.numel() * t.element_size() for t in inputs + outputs)
        for t in outputs:
            self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def _is_view(func, args, outputs: list[Tensor]) -> bool:
    """Whether an op returned views of its inputs (no new memory, no traffic)."""
    if not outputs:
        return True
    ins = {t.untyped_storage()._cdata for t in tree_flatten(args)[0] if isinstance(t, Tensor)}
    return all(t.untyped_storage()._cdata in ins for t in outputs)


def saved_bytes(run: Callable[[], Tensor], exclude: list[Tensor]) -> tuple[Tensor, int]:
    """run() (a forward) and the bytes autograd saved for its backward, each storage once, without the
    storages of `exclude` (parameters)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen.setdefault(storage._cdata, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


@dataclass
class StepCount:
    """What one training step (forward, loss, backward, optimiser step) holds and does."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    input_bytes: int
    saved_bytes: int  # activations saved for backward at the end of the forward
    peak_bytes: int  # high-water mark of everything above plus temporaries, over the whole step
    flops: int
    traffic_bytes: int
    ops: int


def count_step(
    model: torch.nn.Module, x: Tensor, y: Tensor, loss_fn, optimizer_cls, autocast=None
) -> StepCount:
    """Count one training step of `model` on (x, y) with a fresh `optimizer_cls` (e.g. torch.optim.NAdam).

    Works on meta tensors. The first step allocates the optimiser's state, so this is the first step's
    peak, which is every later step's too (the state is then already there and the peak is the same sum).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    optimizer = optimizer_cls(params, lr=1e-3)
    autocast = autocast or contextlib.nullcontext()  # (no autocast on the meta device)
    live, flops = LiveBytes(), FlopCounterMode(display=False)
    with flops, live:
        live.current = live.peak = param_bytes + x.numel() * x.element_size() + y.numel() * y.element_size()
        with autocast:
            logits, saved = saved_bytes(lambda: model(x), [*params, x])
        loss = loss_fn(logits.float(), y)
        del logits
        loss.backward()
        optimizer.step()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    return StepCount(
        param_bytes=param_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=sum(t.numel() * t.element_size() for t in state),
        input_bytes=x.numel() * x.element_size() + y.numel() * y.element_size(),
        saved_bytes=saved,
        peak_bytes=live.peak,
        flops=flops.get_total_flops(),
        traffic_bytes=live.traffic,
        ops=live.ops,
    )


@dataclass(frozen=True)
class GPU:
    """Datasheet peaks of a GPU (dense, no sparsity)."""

    name: str
    memory_gb: float
    fp32_tflops: float  # what float32 convolutions run at (TF32 tensor cores where cuDNN uses them)
    bf16_tflops: float | None  # None: no bfloat16 tensor cores
    bandwidth_tbs: float


# NVIDIA datasheets. V100 SXM2 16 GB: 15.7 TFLOPS FP32, 900 GB/s, no bf16 (its tensor cores are fp16 only).
# H200 SXM: 494 TFLOPS TF32 (dense; PyTorch's cuDNN convolutions use TF32 by default,
# torch.backends.cudnn.allow_tf32), 989 TFLOPS BF16 dense, 4.8 TB/s.
V100 = GPU("V100 16 GB", 16, 15.7, None, 0.9)
H200 = GPU("H200", 141, 494.0, 989.0, 4.8)
# Stated fractions of those peaks (ours, not measured: the GPU table replaces them): 3D convolutions of
# 12-192 channels at batch 1 reach a modest share of the compute peak; elementwise work and norms a
# larger share of the bandwidth; eager PyTorch pays ~10 us of CPU per operation, hidden while the GPU
# is busier than that.
COMPUTE_FRACTION = 0.3
BANDWIDTH_FRACTION = 0.6
SECONDS_PER_OP = 10e-6


def gpu_step_seconds(count: StepCount, gpu: GPU, bf16: bool = False) -> float:
    """Estimated step time: FLOPs at COMPUTE_FRACTION of the peak plus traffic at BANDWIDTH_FRACTION of
    the bandwidth, and at least the CPU's time to launch the operations."""
    peak = gpu.bf16_tflops if bf16 and gpu.bf16_tflops else gpu.fp32_tflops
    device = count.flops / (COMPUTE_FRACTION * peak * 1e12) + count.traffic_bytes / (
        BANDWIDTH_FRACTION * gpu.bandwidth_tbs * 1e12
    )
    return max(device, count.ops * SECONDS_PER_OP)
