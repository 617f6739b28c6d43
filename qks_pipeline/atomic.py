"""Files written whole or not at all: to a temporary name beside the target, fsynced, renamed.

A reader, a resumed run or DVC never sees half a file, and a failed write (a full disk, a kill in
Python code) leaves no temporary file holding the space. The one mechanism for every file qks writes
outside the Zarr arrays (manifests, metrics, checkpoints, done markers, HDF5 exports, predictions).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

# `atomic_path`'s temporary names: what a write killed before its rename leaves
TEMPORARY = re.compile(r"^\..+\.tmp\d+$")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path (`.<name>.tmp<pid>`) to write, renamed to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporary(directory: str | Path) -> list[Path]:
    """Delete the temporary files (`.<name>.tmp<pid>`) that killed writes left in `directory` (not
    below it); returns them. Call it only while no other process writes there (under a lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    left = [p for p in directory.iterdir() if TEMPORARY.match(p.name) and p.is_file()]
    for path in left:
        path.unlink(missing_ok=True)
    return left


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically and durably; an OSError names `path`."""
    try:
        if isinstance(data, str):
            data = data.encode("utf-8")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


@contextlib.contextmanager
def atomic_stream(path: str | Path) -> Iterator[TextIO]:
    """A UTF-8 text file to write line by line, put in place only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_csv(
    path: str | Path, rows: list[dict[str, Any]], fields: list[str] | None = None
) -> None:
    """Rows as CSV with a header (the first row's keys unless `fields`), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())
