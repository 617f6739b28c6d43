"""Where tensors run: the one reading of `--device`, and float16 autocast on CUDA."""

from __future__ import annotations

import contextlib

import torch

from qks_pipeline.errors import QKSError


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; asking for CUDA without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QKSError(f"--device {device} asked for, but torch sees no CUDA device (use --device cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise QKSError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when `enabled`; a no-op on the CPU."""
    return torch.autocast("cuda", dtype=torch.float16, enabled=enabled and device.type == "cuda")
