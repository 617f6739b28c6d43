"""Data-parallel training on PyTorch's own engine: torch.distributed, DistributedDataParallel, the elastic launcher.

`qks train --nproc N` (or `train.nproc: N`) starts N local processes through `torch.distributed.launcher` (what
`torchrun --standalone --nproc-per-node N` does); across nodes, start `qks train` under torchrun itself, e.g.
`torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --no-python qks train ...`
(or `python -m qks_pipeline.cli train ...`). A process started by either finds RANK / WORLD_SIZE in its environment.

Every rank's loader draws the same seeded order of the epoch and cuts the same global batches, of which each rank reads
only its contiguous share (`CacheLoader.part`; sizes differ by at most one, and a share may be empty): the shares are
disjoint and together the whole epoch, without duplicates. A rank's loss is weighted by its share of the batch, so that
DDP's gradient mean equals the gradient of one process on the whole batch, the last partial batch included. NCCL on
CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from qks_pipeline.errors import QKSError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a distributed launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched as one of several ranks; returns this rank's device."""
    if rank_and_world()[1] == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))  # rank 0 validates alone meanwhile
    return device


def from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a no-op in one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the ranks."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel (gradients averaged over the ranks) when several ranks run."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """One rank's work (module level, so that the launcher can pickle it); the error file records an exception."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        return record(fn)(**kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run `fn(**kwargs)` in `nproc` local ranks through the elastic launcher; returns rank 0's result.

    A rank that fails ends the run: QKSError naming the first failing rank and its cause (the exception's last line, or
    the signal that killed it).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # failures: the one line below
    run = {"run_id": uuid.uuid4().hex, "rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "max_restarts": 0}
    config = LaunchConfig(1, 1, nproc, monitor_interval=0.2, start_method="spawn", shutdown_timeout=5, **run)
    try:
        return elastic_launch(config, _call)(fn, kwargs)[0]
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        lines = str(message).strip().splitlines()
        # a user error reads as it would in one process
        cause = lines[-1].removeprefix(f"{QKSError.__name__}: ") if lines else f"exit code {failure.exitcode}"
        raise QKSError(f"training rank {rank} of {nproc} failed: {cause}") from None
