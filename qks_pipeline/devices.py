"""Where tensors run: the one reading of `--device`; the one autocast (reduced precision on GPU);
how CPU threads wait for each other (`quiet_cpu_waits`).

Importing this module loads no torch (each function loads it when called), so that the command
line can set OpenMP's wait policy before torch loads and reads it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

from qks_pipeline.errors import QKSError

if TYPE_CHECKING:
    import torch

# OpenMP's idle threads sleep instead of spinning. On a CPU shared with another busy process, the
# spinning threads of torch's default pool hold the cores that the thread they wait for needs: on
# 2 cores a 2-epoch training took up to 35 s instead of 4 (README, "Benchmarks": bench_threads.py)
CPU_WAITS = {"OMP_WAIT_POLICY": "PASSIVE"}


def quiet_cpu_waits() -> bool:
    """Set `CPU_WAITS` in this process's environment, where the user has not set them.

    OpenMP reads them once, when torch loads: returns False (and sets nothing) when torch is loaded
    already. Child processes (data-loader workers, dask workers) inherit them.
    """
    if "torch" in sys.modules:
        return False
    for name, value in CPU_WAITS.items():
        os.environ.setdefault(name, value)
    return True


def __getattr__(name: str) -> Any:
    """`AMP_DTYPES`, a `precision` setting's autocast dtype: built on first use (it loads torch)."""
    if name == "AMP_DTYPES":
        import torch

        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; asking for CUDA without a GPU is a user error."""
    import torch

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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on CUDA; a no-op (float32) when `dtype` is None or on the CPU."""
    import torch

    enabled = dtype is not None and device.type == "cuda"
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)
