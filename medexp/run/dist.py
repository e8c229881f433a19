"""Process-group setup, the rank-0 guard and all-reduce helpers (DDP: NCCL on GPUs, gloo on CPU).

Single-node multi-device runs start their workers with torch.multiprocessing from inside the Hydra job;
multi-node runs use torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class DistContext:
    """Where this process sits: its rank among world_size processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(accelerator: str, local_rank: int = 0) -> torch.device:
    """cuda:<local_rank> when asked for (or 'auto' and CUDA is present), else cpu."""
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.accelerator=cuda but CUDA is not available on this machine")
    if accelerator in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def free_port() -> int:
    """A free TCP port on the loopback interface for the rendezvous of spawned workers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def setup(rank: int, world_size: int, accelerator: str, port: int | None = None) -> DistContext:
    """Join the process group (when world_size > 1) and pick this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(accelerator, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        if port is not None:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(port)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        torch_dist.barrier()


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a Python float over all ranks (identity when not distributed)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    torch_dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def all_finite(value: torch.Tensor, ctx: DistContext) -> bool:
    """Whether `value` is finite on every rank: the same answer on all ranks (an all-reduce of a 0/1
    flag with MIN), so that they all go on to backward or all stop; without DDP, torch.isfinite."""
    finite = bool(torch.isfinite(value).all())
    if not ctx.distributed:
        return finite
    flag = torch.tensor([int(finite)], dtype=torch.int32, device=ctx.device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_object(obj, ctx: DistContext):
    """rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
