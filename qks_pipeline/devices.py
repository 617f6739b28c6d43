"""Where tensors run: the one reading of `--device`; the one autocast (reduced precision on GPU)."""

from __future__ import annotations

import contextlib

import torch

from qks_pipeline.errors import QKSError


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; asking for CUDA without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QKSError(
            f"--device {device} asked for, but torch sees no CUDA device (use --device cpu or auto)"
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise QKSError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None


# a `precision` setting's autocast dtype
AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on CUDA; a no-op (float32) when `dtype` is None or on the CPU."""
    enabled = dtype is not None and device.type == "cuda"
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)
