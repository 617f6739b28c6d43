"""Reading token rows out of a store: from the shard files where the layout allows, else via zarr.

The shard layout: docs/design.md, section 2; why it is read directly, with `os.preadv`, and what
checking costs: section 3. `ShardReader` checks the index's checksum, that every entry lies in the
file with the one possible length, and each sample's crc32c the first time it reads it; any damage
is one `QKSError` naming the shard file and row. Other stores (other codecs, a URL) are read by
TensorStore (a local store) or zarr-python: `ArrayReader`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import google_crc32c  # zarr's own crc32c dependency (docs/design.md, section 3)
import numpy as np
import tensorstore
import zarr

from qks_pipeline.errors import QKSError
from qks_pipeline.store.checked import DAMAGE, REBUILD, chunk_path
from qks_pipeline.store.location import Location

ABSENT = np.uint64(2**64 - 1)  # (offset, nbytes) of an inner chunk never written
BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
# the inner and the index codecs read directly
LAYOUTS = ([BYTES], [BYTES, {"name": "crc32c"}])
# shard files kept open with their checked index (a batch spans at most two windows of 8 shards)
OPEN_SHARDS = 64
ADVISE = hasattr(os, "posix_fadvise")  # not on macOS


class Reader(Protocol):
    def read(self, rows: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
        """Put the tokens of each (row, view) pair into `out` (n, T, D) float16."""


@dataclass
class ShardReader:
    """Reads a local store's token rows directly from its shard files."""

    root: Path  # the tokens array's directory
    separator: str  # of the chunk keys: "c/<shard>/0/0/0"
    shard_shape: tuple[int, int]  # (S, V) inner chunks per shard
    sample_bytes: int  # T x D x 2
    chunk_crc: bool  # each inner chunk ends with its crc32c (format version 2)
    index_crc: bool
    index_at_start: bool
    # check each chunk's crc32c the first time this reader reads it (where the store has them)
    verify: bool = True
    # every chunk written (format version 3): a missing shard file or chunk is damage, not zeros
    every_chunk: bool = False
    # the store's rows: the last shard's chunks past them are never written
    num_rows: int = 0
    # shard -> file, path, offsets
    _open: dict[int, tuple[Any, Path, np.ndarray]] = field(default_factory=dict)
    # shard -> (S, V) bool: chunks verified so far
    _checked: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def _index_bytes(self) -> int:
        """The size of a shard's index as stored: (offset, nbytes) uint64 per chunk, a crc32c."""
        s, v = self.shard_shape
        return s * v * 16 + 4 * self.index_crc

    def _read_index(
        self, file: Any, size: int, path: Path, row: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A shard file's index, its checksum checked: (offset, nbytes), (S, V) uint64 each."""
        s, v = self.shard_shape
        stored = self._index_bytes
        if size < stored:
            raise QKSError(
                f"row {row}: shard file of {size} bytes, shorter than its index (truncated)", path
            )
        position = 0 if self.index_at_start else size - stored
        raw = os.pread(file.fileno(), stored, position)
        index_bytes = s * v * 16
        if self.index_crc:
            stored_crc = int.from_bytes(raw[index_bytes:], "little")
            if google_crc32c.value(raw[:index_bytes]) != stored_crc:
                problem = "shard index checksum mismatch (corrupt or truncated shard file)"
                raise QKSError(f"row {row}: {problem}", path)
        # (S, V, 2): (offset, nbytes) of each inner chunk
        entries = np.frombuffer(raw, "<u8", count=s * v * 2).reshape(s, v, 2)
        return entries[..., 0], entries[..., 1]

    def _load(self, shard: int, row: int) -> tuple[Any, Path, np.ndarray]:
        """The open file of `shard` and its offsets (S, V) int64 (-1: absent), its index checked."""
        s, v = self.shard_shape
        path = self.root / self.separator.join(["c", str(shard), "0", "0", "0"])
        # before format version 3 zarr wrote no shard whose chunks all held the fill value
        if not path.exists():
            if self.every_chunk:
                raise QKSError(f"row {row}: shard file missing; {REBUILD}", path)
            return None, path, np.full((s, v), -1, np.int64)
        file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed when evicted)
        size = os.fstat(file.fileno()).st_size
        offset, nbytes = self._read_index(file, size, path, row)
        # the chunks lie after an index at the start, or before an index at the end
        stored = self._index_bytes
        start = stored if self.index_at_start else 0
        end = np.uint64(size if self.index_at_start else size - stored)
        length = np.uint64(self.sample_bytes + 4 * self.chunk_crc)
        # (end - offset) wraps around only where offset > end, which the second term already refuses
        inside = (offset >= start) & (offset <= end) & (end - offset >= length)
        absent = offset == ABSENT
        # (S, 1): rows of the store, whose chunks version 3 always writes
        in_store = (shard * s + np.arange(s) < self.num_rows)[:, None]
        bad_absent = (nbytes != ABSENT) | (self.every_chunk & in_store)
        bad = np.argwhere(np.where(absent, bad_absent, (nbytes != length) | ~inside))
        if len(bad):
            r, view = bad[0]
            what = f"offset {offset[r, view]}, {nbytes[r, view]} bytes"
            message = (
                f"index entry ({what}) outside the data or not {length} bytes (corrupt shard file)"
            )
            if absent[r, view] and nbytes[r, view] == ABSENT:
                message = f"chunk missing from the shard file; {REBUILD}"
            raise QKSError(f"row {shard * s + r} view {view}: {message}", path)
        return file, path, np.where(absent, -1, offset.astype(np.int64))

    def read(self, rows: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
        chunks, runs = self._locate(rows, views)
        # the disk gets every read of the batch at once: a deep queue
        if ADVISE:
            for file, start, stop in runs:
                os.posix_fadvise(file.fileno(), start, stop - start, os.POSIX_FADV_WILLNEED)
        self._read_chunks(chunks, out)
        # close the least recently used
        while len(self._open) > OPEN_SHARDS:
            file = self._open.pop(next(iter(self._open)))[0]
            if file is not None:
                file.close()

    def _locate(self, rows: np.ndarray, views: np.ndarray) -> tuple[list[tuple], list[list]]:
        """Each (row, view)'s chunk, and the byte runs [file, start, stop] to advise the kernel of.

        A chunk is (row, view, file, path, offset (-1: absent), its shard's checked flags).
        """
        s = self.shard_shape[0]
        length = self.sample_bytes + 4 * self.chunk_crc
        chunks = []
        runs = []
        for row, view in zip(rows.tolist(), views.tolist(), strict=True):
            shard = row // s
            # re-inserted: the most recently used comes last
            self._open[shard] = self._open.pop(shard, None) or self._load(shard, row)
            file, path, offsets = self._open[shard]
            if shard not in self._checked:
                self._checked[shard] = np.zeros(self.shard_shape, bool)
            offset = int(offsets[row % s, view])
            chunks.append((row, view, file, path, offset, self._checked[shard]))
            # contiguous chunks (rows in order): one advice
            if runs and runs[-1][0] is file and runs[-1][2] == offset:
                runs[-1][2] += length
            elif offset >= 0:
                runs.append([file, offset, offset + length])
        return chunks, runs

    def _read_chunks(self, chunks: list[tuple], out: np.ndarray) -> None:
        """Read each located chunk into its sample of `out`, checking its crc32c once."""
        s = self.shard_shape[0]
        verify = self.chunk_crc and self.verify
        crc = bytearray(4)
        for sample, (row, view, file, path, offset, checked) in zip(out, chunks, strict=True):
            if offset < 0:
                # an absent chunk holds the fill value
                sample[...] = 0
                continue
            check = verify and not checked[row % s, view]
            buffers = [sample, crc] if check else [sample]
            if os.preadv(file.fileno(), buffers, offset) != self.sample_bytes + 4 * check:
                raise QKSError(
                    f"row {row} view {view}: chunk cut short (truncated shard file)", path
                )
            if check and google_crc32c.value(sample) != int.from_bytes(crc, "little"):
                raise QKSError(
                    f"row {row} view {view}: chunk checksum mismatch (corrupt shard file)", path
                )
            checked[row % s, view] |= check


def shard_reader(
    location: Location, tokens: zarr.Array, every_chunk: bool = False
) -> ShardReader | None:
    """A direct reader for a local store in the layout of docs/design.md (section 2), else None.

    `every_chunk`: the store wrote every chunk (format version 3, `Cache.every_chunk_written`).
    """
    # Windows has no preadv
    if not location.local or not hasattr(os, "preadv"):
        return None
    root = location.url / "tokens"
    meta = json.loads((root / "zarr.json").read_text())
    codec, *others = meta["codecs"]
    keys = meta["chunk_key_encoding"]
    config = codec.get("configuration", {})
    inner = config.get("codecs")
    index = config.get("index_codecs")
    sharded = (
        not others
        and codec["name"] == "sharding_indexed"
        and config["chunk_shape"] == [1, 1, *tokens.shape[2:]]
    )
    plain = (meta["data_type"], meta["fill_value"], keys["name"]) == ("float16", 0, "default")
    if not (sharded and plain and inner in LAYOUTS and index in LAYOUTS):
        return None
    shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"][:2])
    separator = keys.get("configuration", {}).get("separator", "/")
    at_start = config.get("index_location", "end") == "start"
    sample_bytes = int(np.prod(tokens.shape[2:])) * 2
    return ShardReader(
        root,
        separator,
        shard_shape,
        sample_bytes,
        chunk_crc=len(inner) == 2,
        index_crc=len(index) == 2,
        index_at_start=at_start,
        every_chunk=every_chunk,
        num_rows=tokens.shape[0],
    )


@dataclass
class ArrayReader:
    """Token rows through TensorStore (a local store) or zarr-python (any store, including URLs)."""

    array: Any  # a tensorstore.TensorStore or a zarr.Array of the tokens
    where: Path | str = "tokens"  # the tokens array's directory, named by an error

    def read(self, rows: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
        try:
            self._read(rows, views, out)
        # a damaged shard: a checksum mismatch, a truncated file
        except DAMAGE as e:
            why = str(e).splitlines()[0][:160]
            message = f"rows {rows.min()}-{rows.max()} unreadable ({why}); {REBUILD}"
            raise QKSError(message, self.where) from None

    def _read(self, rows: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
        if not isinstance(self.array, zarr.Array):
            # (n, T, D)
            out[...] = self.array[tensorstore.d[0, 1].vindex[rows, views]].read().result()
            return
        # zarr's orthogonal selection: one call per view present
        for view in np.unique(views).tolist():
            pick = views == view
            # (n_view, T, D)
            out[pick] = self.array.oindex[rows[pick], view]


def open_reader(
    location: Location, tokens: zarr.Array, backend: str = "auto", every_chunk: bool = False
) -> Reader:
    """The reader of a store's tokens.

    `backend`: "direct", "tensorstore" (local stores), "zarr", or "auto": direct where the store
    allows, else TensorStore for a local store, else zarr-python (a URL). `every_chunk`: as
    `shard_reader`'s (the others read a missing shard as zeros: `Cache.require_complete` checks
    that every shard file is there).
    """
    if backend in ("auto", "direct"):
        direct = shard_reader(location, tokens, every_chunk)
        if direct is not None:
            return direct
    if backend == "direct":
        raise QKSError("the direct reader reads local uncompressed stores only", location.url)
    if backend == "tensorstore" and not location.local:
        raise QKSError(
            "the tensorstore backend reads local stores only; use the zarr backend for a URL",
            location.url,
        )
    where = chunk_path(location, "tokens")
    if backend == "zarr" or not location.local:
        return ArrayReader(tokens, where)
    kvstore = {"driver": "file", "path": str(location.url / "tokens")}
    spec = {"driver": "zarr3", "kvstore": kvstore}
    return ArrayReader(tensorstore.open(spec, read=True).result(), where)
