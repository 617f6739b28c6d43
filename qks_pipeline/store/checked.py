"""Every chunk of an array checked: there, and whole (docs/design.md, section 2).

From format version 3 a store writes each array with `create_checked`: every chunk, also one equal
to the fill value (zarr's `write_empty_chunks`), each ending with its crc32c (zarr's `crc32c`
codec, which zarr-python checks whenever it decodes the chunk). So a chunk that is not there is
damage, never a fill value: `missing_chunks` finds such chunks with one listing, and
`CheckedArray` turns a damaged chunk met while reading into one `QKSError` naming its file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from qks_pipeline.errors import QKSError
from qks_pipeline.store.location import Location

# zarr's default compressor, kept as it was; then each chunk's crc32c
COMPRESSED = (zarr.codecs.ZstdCodec(level=0, checksum=False), zarr.codecs.Crc32cCodec())
# uncompressed (the token shards: docs/design.md, section 3)
RAW = (zarr.codecs.Crc32cCodec(),)
# every chunk written, also one equal to the fill value: an absent chunk is damage
EVERY_CHUNK = {"write_empty_chunks": True}
# what zarr and numcodecs raise on a chunk that does not decode (a checksum mismatch, a truncated
# or foreign file)
DAMAGE = (ValueError, RuntimeError, TypeError)
REBUILD = "the store is damaged; rebuild it"


def create_checked(
    group: zarr.Group, name: str, *, compress: bool = True, **options: Any
) -> zarr.Array:
    """`group.create_array(name, **options)` with a crc32c on every chunk and every chunk written.

    `compress`: zstd as zarr's default (False: raw bytes, as the token shards).
    """
    codecs = COMPRESSED if compress else RAW
    return group.create_array(name, compressors=list(codecs), config=EVERY_CHUNK, **options)


def has_checksums(array: zarr.Array) -> bool:
    """Whether each chunk (each inner chunk of a shard) of `array` ends with its crc32c."""
    codecs = [c.to_dict() for c in array.metadata.codecs]
    inner = codecs[0].get("configuration", {}).get("codecs", [])
    return any(c["name"] == "crc32c" for c in [*codecs, *inner])


def chunk_keys(array: zarr.Array) -> Iterator[tuple[tuple[int, ...], str]]:
    """(grid coordinates, key under the array's directory) of every chunk (shard) of `array`."""
    for coords in array.metadata.chunk_grid.all_chunk_coords(array.shape):
        yield coords, array.metadata.encode_chunk_key(coords)


def missing_chunks(
    location: Location,
    name: str,
    array: zarr.Array,
    required: Callable[[tuple[int, ...]], bool] = lambda coords: True,
) -> list[str]:
    """Keys (from the store's root) of the chunks of `array` (the store's `name`) that `required`
    asks for and the store does not hold; one listing of the array's directory."""
    present = location.find(name)
    return [
        f"{name}/{key}"
        for coords, key in chunk_keys(array)
        if f"{name}/{key}" not in present and required(coords)
    ]


def chunk_path(location: Location, key: str) -> Path | str:
    """A key of the store as the user sees it: a path, or a URL."""
    return location.url / key if location.local else f"{location.url}/{key}"


def _rows(selection: Any, length: int) -> range | None:
    """The first-axis indices a basic selection reads (None: not a plain int or slice)."""
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, (int, np.integer)):
        i = int(first) % max(length, 1)
        return range(i, i + 1)
    if isinstance(first, slice):
        return range(*first.indices(length))
    return None


@dataclass(frozen=True)
class CheckedArray:
    """A zarr array of a store whose reads name the damaged chunk in one `QKSError`.

    Everything else (shape, dtype, writes) is the zarr array's.
    """

    array: zarr.Array
    location: Location  # the store's root
    name: str  # the array's name in the store

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.array, attribute)

    def __len__(self) -> int:
        return len(self.array)

    def __setitem__(self, selection: Any, value: Any) -> None:
        self.array[selection] = value

    def __getitem__(self, selection: Any) -> Any:
        try:
            return self.array[selection]
        except DAMAGE as e:
            raise self.damage(selection, e) from None

    def damage(self, selection: Any, error: Exception) -> QKSError:
        """The error naming the first chunk the selection reads that does not decode."""
        rows = _rows(selection, self.array.shape[0] if self.array.shape else 0)
        step = self.array.metadata.chunk_grid.chunk_shape
        for coords, key in chunk_keys(self.array):
            first = coords[0] * step[0] if coords else 0
            if rows is not None and coords and not _overlaps(rows, first, first + step[0]):
                continue
            try:
                self.array[_region(self.array, coords)]
            except DAMAGE as e:
                return unreadable_chunk(self.location, f"{self.name}/{key}", e)
        return unreadable_chunk(self.location, self.name, error)


def _region(array: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    """The selection of one chunk."""
    step = array.metadata.chunk_grid.chunk_shape
    return tuple(slice(c * s, (c + 1) * s) for c, s in zip(coords, step, strict=True))


def _overlaps(rows: range, start: int, stop: int) -> bool:
    """Whether `rows` meets [start, stop) (a reversed range: assumed so)."""
    if rows.step < 0:
        return True
    return len(rows) > 0 and rows.start < stop and start < rows.stop


def unreadable_chunk(location: Location, key: str, error: Exception) -> QKSError:
    """One line naming a chunk that does not decode and why."""
    why = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    if "checksum" in why:
        why = "crc32c checksum mismatch (corrupt or truncated file)"
    return QKSError(f"chunk unreadable: {why}; {REBUILD}", chunk_path(location, key))


def missing_error(
    location: Location, missing: list[str], how: str = "", version: int | None = None
) -> QKSError:
    """One line naming the first missing chunk (and how many are); `how`: the flag that rebuilds;
    `version`: the format version of a store before 3, which wrote no chunk equal to the fill."""
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    rebuild = f"{REBUILD} ({how})" if how else REBUILD
    why = "deleted or never written"
    if version is not None and version < 3:
        why = f"deleted, or all fill values, which format version {version} did not write"
        rebuild = f"rebuild the store{f' ({how})' if how else ''}: version 3 writes every chunk"
    return QKSError(f"chunk missing{more} ({why}); {rebuild}", chunk_path(location, missing[0]))


def unreadable_chunks(location: Location, name: str, array: zarr.Array) -> list[str]:
    """One line for each chunk of `array` (the store's `name`) that is there and does not decode
    (its crc32c checked), read a chunk at a time. Not for the token shards: `shard_reader` checks
    those a sample at a time."""
    problems = []
    for coords, key in chunk_keys(array):
        try:
            array[_region(array, coords)]
        except DAMAGE as e:
            problems.append(unreadable_chunk(location, f"{name}/{key}", e).message)
    return problems
