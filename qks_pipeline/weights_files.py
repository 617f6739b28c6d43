"""Reading weights files that may hold anything: one line naming the file and what is wrong.

`torch.load` runs with `weights_only` (unless a caller trusts the file): only tensors and plain
containers are unpickled, so no code in a pickle runs. A file that is empty, truncated, random
bytes, a pickle of other objects, or not the format its name says is one `QKSError`
(`unreadable`), whatever torch, safetensors or open_clip raised.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from qks_pipeline.errors import QKSError

# torch.save's archive format
ZIP_MAGIC = b"PK\x03\x04"
# the protocols of a pickle (torch.save's legacy format, pickle.dump) that torch reads
PICKLE_PROTOCOLS = range(2, 6)
PICKLED_OBJECTS = "holds objects other than tensors, which are not unpickled (no code in it ran)"


def format_problem(path: str | Path) -> str | None:
    """What makes `path` unreadable as weights, from its first bytes, the zip directory or the
    safetensors header, without loading it; None when nothing is found."""
    path = Path(path)
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, "pt"):
                return None
        except SafetensorError as e:
            return f"not a whole safetensors file ({first_line(e)})"
    if head == ZIP_MAGIC:
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            return f"a truncated or corrupt torch.save archive ({first_line(e)})"
        return None
    if len(head) > 1 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return None
    return "not a weights file (neither a torch.save archive, a pickle nor safetensors)"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, at most 160 characters (else its type)."""
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def unreadable(path: str | Path, error: BaseException, what: str, hint: str = "") -> QKSError:
    """One line saying why loading `path` (a `what`) failed with `error`.

    `hint`: what to do about a pickle of objects other than tensors (e.g. the flag that trusts it).
    """
    problem = format_problem(path)
    if problem is None and isinstance(error, pickle.UnpicklingError):
        problem = PICKLED_OBJECTS + (f"; {hint}" if hint else "")
    if problem is None:
        problem = f"{type(error).__name__}: {first_line(error)}"
    return QKSError(f"cannot read {what}: {problem}", path)


def load_torch(path: str | Path, what: str, *, trust_pickle: bool = False, hint: str = "") -> Any:
    """`torch.load` of `path` on the CPU, `weights_only` unless `trust_pickle`; any failure one
    `QKSError` (`unreadable`)."""
    try:
        with warnings.catch_warnings():
            # a pickle of protocol 4 or 5: refused below in one line, the warning would add noise
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    # torch raises a dozen types for a bad file (EOFError, OSError, RuntimeError, UnpicklingError..)
    except Exception as e:
        raise unreadable(path, e, what, hint) from None


def load_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a bad file is one `QKSError`."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise unreadable(path, e, what) from None
