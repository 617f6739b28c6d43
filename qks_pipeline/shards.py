"""Reading token rows out of a store: straight from the shard files where the layout allows, else through zarr.

Stage one writes `tokens` (N, V, T, D) float16 in shards of (S, V, T, D), one file per shard
(`tokens/c/<shard>/0/0/0`) holding S x V inner chunks of one (T, D) sample each, in the zarr v3 sharding layout:
each inner chunk is the sample's raw little-endian bytes (the `bytes` codec), followed by their crc32c from format
version 2 on (the `crc32c` codec); the shard index, at the end of the file (or its start, `index_location`), holds
(offset, nbytes) as little-endian uint64 per inner chunk in C order over (S, V), both 2^64 - 1 for an absent chunk
(zarr writes no chunk equal to the fill value: it reads as zeros), followed by the crc32c of the index (the index
codecs `bytes`, `crc32c`). `ShardReader` reads that layout directly, as the sharding specification defines it: it
checks the index's checksum and that every entry lies inside the file with the one possible length (T x D x 2, + 4
with a chunk checksum), reads each sample with one `os.preadv` straight into the caller's (pinned) batch, and checks
its crc32c. Every damage is one `QKSError` naming the shard file and the row.

`os.preadv` rather than a memory map: the same speed here (benchmarks/bench_loader.py, docs/design.md section 3), one
copy instead of two, and no mapped pages counted in the process's resident memory. Stores the direct reader does not
handle (other codecs, a URL) are read through TensorStore (local) or zarr-python (`ArrayReader`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import google_crc32c  # zarr's own crc32c dependency
import numpy as np
import zarr

from qks_pipeline.errors import QKSError
from qks_pipeline.storage import Location

try:
    import tensorstore
except ImportError:  # optional: zarr-python reads the same store
    tensorstore = None

ABSENT = np.uint64(2**64 - 1)  # (offset, nbytes) of an inner chunk that was never written
BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
CRC32C = {"name": "crc32c"}
OPEN_SHARDS = 64  # shard files kept open, with their parsed index (a batch draws from a window of a few shards)


class Reader(Protocol):
    def read(self, rows: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
        """Put the tokens of each (row, view) pair into `out` (n, T, D) float16."""


def _crc(data: Any) -> int:
    return google_crc32c.value(data)


@dataclass
class ShardReader:
    """Reads a local store's token rows directly from its shard files (see the module docstring)."""

    root: Path  # the tokens array's directory
    separator: str  # of the chunk keys: "c/<shard>/0/0/0"
    shard_shape: tuple[int, int]  # (S, V) inner chunks per shard
    sample_bytes: int  # T x D x 2
    chunk_crc: bool  # each inner chunk ends with its crc32c (format version 2)
    index_crc: bool
    index_at_start: bool
    verify: bool = True  # check each chunk's crc32c as it is read (where the store has them)
    _open: dict[int, tuple[Any, Path, np.ndarray]] = field(default_factory=dict)  # shard -> file, path, offsets

    def _load(self, shard: int, row: int) -> tuple[Any, Path, np.ndarray]:
        """The open file of `shard` and its offsets (S, V) int64 (-1: absent) after checking its index."""
        s, v = self.shard_shape
        path = self.root / self.separator.join(["c", str(shard)] + ["0"] * 3)
        if not path.exists():  # zarr writes no shard whose chunks are all absent
            return None, path, np.full((s, v), -1, np.int64)
        file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed when evicted or collected)
        size, index_bytes = os.fstat(file.fileno()).st_size, s * v * 16
        stored = index_bytes + 4 * self.index_crc
        if size < stored:
            raise QKSError(f"row {row}: shard file of {size} bytes, shorter than its index (truncated)", path)
        raw = os.pread(file.fileno(), stored, 0 if self.index_at_start else size - stored)
        if self.index_crc and _crc(raw[:index_bytes]) != int.from_bytes(raw[index_bytes:], "little"):
            raise QKSError(f"row {row}: shard index checksum mismatch (corrupt or truncated shard file)", path)
        table = np.frombuffer(raw, "<u8", count=s * v * 2).reshape(s, v, 2)  # (S, V, (offset, nbytes))
        offset, nbytes = table[..., 0], table[..., 1]
        absent = offset == ABSENT
        start, end = (stored, size) if self.index_at_start else (0, size - stored)
        length, end_ = np.uint64(self.sample_bytes + 4 * self.chunk_crc), np.uint64(end)
        outside = (
            (offset < start) | (offset > end_) | (end_ - offset < length)
        )  # the last wraps only where offset > end
        bad = np.where(absent, nbytes != ABSENT, (nbytes != length) | outside)
        if bad.any():
            r, view = np.argwhere(bad)[0]
            raise QKSError(
                f"row {shard * s + r} view {view}: shard index entry (offset {offset[r, view]}, {nbytes[r, view]} "
                f"bytes) outside the file's {end - start} data bytes or not {length} bytes long (corrupt shard file)",
                path,
            )
        return file, path, np.where(absent, -1, offset.astype(np.int64))

    def _shard(self, shard: int, row: int) -> tuple[Any, Path, np.ndarray]:
        entry = self._open.pop(shard, None) or self._load(shard, row)
        self._open[shard] = entry  # most recently used last
        if len(self._open) > OPEN_SHARDS:
            file = self._open.pop(next(iter(self._open)))[0]
            if file is not None:
                file.close()
        return entry

    def read(self, rows: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
        s, crc, verify = self.shard_shape[0], bytearray(4), self.chunk_crc and self.verify
        for i, (row, view) in enumerate(zip(rows.tolist(), views.tolist(), strict=True)):
            file, path, offsets = self._shard(row // s, row)
            offset, sample = offsets[row % s, view], out[i]  # (T, D), contiguous
            if offset < 0:
                sample[...] = 0  # an absent chunk holds the fill value
                continue
            parts = [sample, crc] if verify else [sample]
            if os.preadv(file.fileno(), parts, int(offset)) != self.sample_bytes + 4 * verify:
                raise QKSError(f"row {row} view {view}: chunk cut short (truncated shard file)", path)
            if verify and _crc(sample) != int.from_bytes(crc, "little"):
                raise QKSError(f"row {row} view {view}: chunk checksum mismatch (corrupt shard file)", path)


def shard_reader(location: Location, tokens: zarr.Array) -> ShardReader | None:
    """A direct reader for a local store whose tokens have the layout above, else None."""
    if not location.local:
        return None
    root = location.url / "tokens"
    meta = json.loads((root / "zarr.json").read_text())
    codec, *others = meta["codecs"]
    config, keys = codec.get("configuration", {}), meta["chunk_key_encoding"]
    inner, index = config.get("codecs"), config.get("index_codecs")
    layouts = ([BYTES], [BYTES, CRC32C])
    if others or codec["name"] != "sharding_indexed" or meta["data_type"] != "float16" or meta["fill_value"] != 0:
        return None
    if keys["name"] != "default" or config["chunk_shape"] != [1, 1, *tokens.shape[2:]] or inner not in layouts:
        return None
    if index not in layouts:
        return None
    shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"][:2])
    sample_bytes = int(np.prod(tokens.shape[2:])) * 2
    separator = keys.get("configuration", {}).get("separator", "/")
    at_start = config.get("index_location", "end") == "start"
    return ShardReader(root, separator, shard_shape, sample_bytes, len(inner) == 2, len(index) == 2, at_start)


@dataclass
class ArrayReader:
    """Token rows through TensorStore (a local store) or zarr-python (any store, including URLs)."""

    array: Any  # a tensorstore.TensorStore or a zarr.Array of the tokens

    def read(self, rows: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
        if not isinstance(self.array, zarr.Array):
            out[...] = self.array[tensorstore.d[0, 1].vindex[rows, views]].read().result()  # (n, T, D)
            return
        for view in np.unique(views).tolist():  # zarr's orthogonal selection: one call per view present
            pick = views == view
            out[pick] = self.array.oindex[rows[pick], view]  # (n_view, T, D)


def open_reader(location: Location, tokens: zarr.Array, backend: str = "auto") -> Reader:
    """The reader of a store's tokens.

    Args:
        backend: "direct" (the shard files, local uncompressed stores), "tensorstore" (local stores), "zarr", or
            "auto": direct where the store allows, else TensorStore for a local store, else zarr-python (a URL).
    """
    direct = shard_reader(location, tokens) if backend in ("auto", "direct") else None
    if direct is not None:
        return direct
    if backend == "direct":
        raise QKSError("the direct reader reads local uncompressed stores only", location.url)
    if backend == "tensorstore" and not location.local:
        raise QKSError("the tensorstore backend reads local stores only; use the zarr backend for a URL", location.url)
    if backend == "zarr" or tensorstore is None or not location.local:
        return ArrayReader(tokens)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(location.url / "tokens")}}
    return ArrayReader(tensorstore.open(spec, read=True).result())
