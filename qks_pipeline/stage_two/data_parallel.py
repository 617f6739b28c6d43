"""Data-parallel training on torch.distributed, DistributedDataParallel and the elastic launcher.

How to launch (`--nproc N`, or torchrun across nodes), and how the ranks share each global batch so
that the gradient equals one process's: README.md, "Several GPUs". A launched process finds RANK /
WORLD_SIZE in its environment.
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
    # a long timeout: the other ranks wait while rank 0 validates alone
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
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
    """`model` in DistributedDataParallel (gradients averaged over the ranks) if several run."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """One rank's work, at module level for the launcher to pickle; errors go to the error file."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        return record(fn)(**kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run `fn(**kwargs)` in `nproc` local ranks (the elastic launcher); returns rank 0's result.

    A failing rank ends the run: QKSError naming the first failing rank and its cause (the
    exception's last line, or the signal).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # a failure is reported by the one line raised below, not by the launcher's log
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        shutdown_timeout=5,
    )
    try:
        return elastic_launch(config, _call)(fn, kwargs)[0]
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        lines = str(message).strip().splitlines()
        if lines:
            # a user error reads as it would in one process
            cause = lines[-1].removeprefix(f"{QKSError.__name__}: ")
        else:
            cause = f"exit code {failure.exitcode}"
        raise QKSError(f"training rank {rank} of {nproc} failed: {cause}") from None
