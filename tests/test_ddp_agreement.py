"""DDP ranks agree whether a step's loss is finite before backward (medexp.run.steps.train_epoch,
medexp.run.dist.all_finite), so a NaN on one rank only cannot leave the other waiting in backward's gradient
all-reduce. Two real gloo processes on CPU, an 8 s collective timeout; the control runs the check each rank
made on its own before (return NaN before backward) and shows rank 0 stuck until that timeout."""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medexp.run.dist import DistContext, free_port
from medexp.run.steps import numerics, train_epoch

pytestmark = pytest.mark.slow  # two spawned processes each (torch import); the control waits its timeout

TIMEOUT = 8.0


class Bar:
    def step(self, loss: float) -> None:
        pass


def loss_of(rank: int):
    """Mean squared error; on rank 1 times NaN (its batch is non-finite), on rank 0 finite."""
    return lambda logits, label: (logits - label).pow(2).mean() * (math.nan if rank == 1 else 1.0)


def old_epoch(net, loader, loss_fn, optimizer) -> float:
    """The check as it was: each rank alone, before backward."""
    for batch in loader:
        optimizer.zero_grad()
        loss = loss_fn(net(batch["image"]), batch["label"])
        if not torch.isfinite(loss):
            return math.nan
        loss.backward()  # DDP's gradient all-reduce: waits for every rank
        optimizer.step()
    return 0.0


def rank_main(rank: int, port: int, agree: bool, results) -> None:
    try:
        results.put((rank, *one_epoch(rank, port, agree)))
    except BaseException as err:  # reported, so that the test does not wait for a result never sent
        results.put((rank, "crashed", repr(err), math.nan))


def one_epoch(rank: int, port: int, agree: bool) -> tuple[str, object, float]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=300))  # slow starts
    short = dist.new_group([0, 1], timeout=timedelta(seconds=TIMEOUT))  # the gradient all-reduce's timeout
    torch.manual_seed(0)  # the same weights on both ranks: no initial broadcast needed (init_sync=False),
    # so the short group's first collective is backward's gradient all-reduce
    net = DistributedDataParallel(nn.Linear(3, 1), process_group=short, init_sync=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = [{"image": torch.ones(2, 3), "label": torch.zeros(2, 1)}] * 3
    started = time.monotonic()
    try:
        if agree:
            ctx = DistContext(rank=rank, world_size=2)
            steps = numerics("32", False, 2, torch.device("cpu"))
            value = train_epoch(net, loader, loss_of(rank), optimizer, steps, ctx, Bar())
        else:
            value = old_epoch(net, loader, loss_of(rank), optimizer)
            if rank == 1:
                time.sleep(TIMEOUT + 3)  # alive, but busy elsewhere: rank 0 waits for it in backward
        return "returned", value, time.monotonic() - started
    except RuntimeError as err:
        return "collective failed", str(err).splitlines()[0], time.monotonic() - started


def two_ranks(agree: bool) -> dict[int, tuple]:
    """Run `rank_main` on ranks 0 and 1; {rank: (status, value or message, seconds in the epoch)}."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, agree, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        out = {}
        for _ in procs:
            rank, *rest = results.get(timeout=600)
            out[rank] = tuple(rest)
        return out
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def test_ranks_agree_and_both_stop_when_one_rank_has_a_non_finite_loss():
    out = two_ranks(agree=True)
    for rank in (0, 1):
        status, value, seconds = out[rank]
        # had rank 0 gone on to backward alone, it would have failed after the timeout instead
        assert status == "returned" and math.isnan(value), out


def test_control_a_rank_alone_leaves_the_other_waiting_in_backward():
    out = two_ranks(agree=False)
    assert out[1][0] == "returned" and math.isnan(out[1][1]), out
    status, message, seconds = out[0]
    assert status == "collective failed", f"rank 0 should have been stuck in backward: {out}"
    assert seconds >= TIMEOUT - 0.5, f"it waited for the gradient all-reduce until the timeout: {message}"
