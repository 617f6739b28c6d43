"""The feature cache: one Zarr v3 store per split, written by stage one and read by stage two.

Arrays, attributes and done markers: docs/design.md, section 2; the shard byte layout is read in
`qks_pipeline.store.shard_reader`. A store is a local directory or an fsspec URL
(`qks_pipeline.store.location`), so `Cache.path` is a Path or a URL string.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from qks_pipeline.errors import QKSError
from qks_pipeline.store.checked import (
    EVERY_CHUNK,
    REBUILD,
    CheckedArray,
    chunk_path,
    create_checked,
    missing_chunks,
    missing_error,
)
from qks_pipeline.store.fingerprint import READ_VERSIONS, describe_backbone
from qks_pipeline.store.location import Location
from qks_pipeline.store.sharded import ShardedStore, done_marker

# a full disk, a quota, a file-size limit: a user error
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The arrays every feature store holds (docs/design.md, section 2).
ARRAYS = ("tokens", "labels", "valid", "paths", "manifest_index", "visual_proj")
# written a shard at a time, before the shard's done marker: one chunk (tokens: one file) a shard
PER_SHARD = ("tokens", "valid")


@dataclass
class Cache(ShardedStore):
    """An open feature store: arrays are zarr arrays, read lazily (`cache.valid[:]` gives numpy);
    all but the tokens (read by `store.shard_reader`) name a damaged chunk (`CheckedArray`)."""

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The backbone and data the store was built from."""
        return self.group.attrs["fingerprint"]

    @property
    def format_version(self) -> int:
        return int(self.fingerprint["format_version"])

    @property
    def every_chunk_written(self) -> bool:
        """From format version 3 every chunk is written: an absent one is damage, never a fill."""
        return self.format_version >= 3

    def checked(self, name: str) -> CheckedArray:
        """The array `name`, its damaged chunks one error naming the file (`store.checked`)."""
        return CheckedArray(self.group[name].with_config(EVERY_CHUNK), self.location, name)

    @property
    def label_names(self) -> list[str]:
        """Seen then unseen labels."""
        return list(self.group.attrs["labels"])

    @property
    def num_seen(self) -> int:
        return int(self.group.attrs["num_seen"])

    @property
    def tokens(self) -> zarr.Array:
        """(N, V, T, D) float16 visual tokens; read through `store.shard_reader`."""
        return self.group["tokens"].with_config(EVERY_CHUNK)

    @property
    def labels(self) -> CheckedArray:
        """(N, C) int8: +1 positive, -1 negative, 0 unknown."""
        return self.checked("labels")

    @property
    def valid(self) -> CheckedArray:
        """(N,) bool: False for an unreadable image."""
        return self.checked("valid")

    @property
    def paths(self) -> CheckedArray:
        """(N,) the image of each row."""
        return self.checked("paths")

    @property
    def manifest_index(self) -> CheckedArray:
        """(N,) each row's line in the manifest."""
        return self.checked("manifest_index")

    @property
    def visual_proj(self) -> CheckedArray:
        """(D, E) float32: CLIP's visual projection."""
        return self.checked("visual_proj")

    @property
    def num_images(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_views(self) -> int:
        return self.tokens.shape[1]

    def num_rows(self, shards: Iterable[int]) -> int:
        return sum(self.shard_rows(s).stop - self.shard_rows(s).start for s in shards)

    def done_record(self, shard: int) -> dict[str, Any]:
        """A finished shard's marker: {"shard", "rows": [start, stop], "skipped": [...]}.

        Each skipped image is {"path", "reason"}.
        """
        try:
            return json.loads(self.location.read_text(done_marker(shard)))
        except (ValueError, FileNotFoundError) as e:
            message = f"done marker unreadable ({type(e).__name__}); {REBUILD}"
            raise QKSError(message, chunk_path(self.location, done_marker(shard))) from None

    def write_shard(
        self, shard: int, tokens: np.ndarray, valid: np.ndarray, skipped: list[dict[str, str]]
    ) -> None:
        """Write one whole shard, then its done marker (the only proof the shard is complete)."""
        rows = self.shard_rows(shard)
        n = rows.stop - rows.start
        assert tokens.shape[0] == n and valid.shape == (n,), (tokens.shape, valid.shape, n)
        record = {"shard": shard, "rows": [rows.start, rows.stop], "skipped": skipped}
        try:
            self.tokens[rows] = tokens.astype(np.float16, copy=False)
            self.valid[rows] = valid
            self.location.write_text(done_marker(shard), json.dumps(record))
        except OSError as e:  # the shard stays not done: a rerun redoes it
            if e.errno not in NO_SPACE:
                raise  # maybe transient (a network store): a cluster run retries it
            raise QKSError(
                f"cannot write shard {shard}: {e.strerror}", e.filename or self.path
            ) from None

    def skipped(self) -> list[dict[str, str]]:
        """Every image recorded as unreadable, over all finished shards."""
        return [
            image
            for shard in sorted(self.done_shards())
            for image in self.done_record(shard)["skipped"]
        ]

    def require_complete(self) -> None:
        """Refuse a store with a shard not extracted or a chunk missing (`missing_chunks`).

        Checked once per `Cache`: a listing of the done markers and of each array.
        """
        if self._complete:
            return
        missing = self.num_shards - len(self.done_shards())
        if missing:
            raise QKSError(
                f"cache is incomplete: {missing} of {self.num_shards} shards not extracted; "
                "rerun extract",
                self.path,
            )
        if chunks := self.missing_chunks():
            raise missing_error(self.location, chunks, version=self.format_version)
        self._complete = True

    def lost_shards(self) -> set[int]:
        """Done shards whose token shard file or valid chunk is missing (one listing an array):
        their done markers, now wrong, are removed, so that a rerun computes them again.

        A missing chunk of another array is refused: only a rebuild (--overwrite) writes it.
        """
        missing = self.missing_chunks()
        if other := [key for key in missing if not key.startswith(PER_SHARD)]:
            raise missing_error(self.location, other, "--overwrite")
        # "tokens/c/<shard>/0/0/0", "valid/c/<shard>"
        lost = {int(key.split("/")[2]) for key in missing}
        for shard in sorted(lost):
            self.location.delete(done_marker(shard))
        return lost

    def missing_chunks(self, shards: set[int] | None = None) -> list[str]:
        """Keys of the chunks the store must hold and does not: every chunk of every array, those
        of tokens and valid for the done shards only (or `shards`); one listing an array."""
        done = self.done_shards() if shards is None else shards
        missing = []
        for name in ARRAYS:
            required = self._required(name, done)
            missing += missing_chunks(self.location, name, self.group[name], required)
        return missing

    def _required(self, name: str, done: set[int]) -> Callable[[tuple[int, ...]], bool]:
        """Whether the chunk at grid coordinates must be there (asked of absent chunks only).

        Before format version 3 no chunk equal to the fill value was written: a done shard whose
        every row was unreadable had no tokens nor valid chunk, a one-image store's manifest index
        0 none. Any other absent chunk is refused (the message says a rebuild writes it: in such a
        store, a `labels` shard without one annotation was not written either).
        """
        if name not in PER_SHARD:
            fill_only = name == "manifest_index" and self.num_images == 1
            return lambda coords: self.every_chunk_written or not fill_only

        def required(coords: tuple[int, ...]) -> bool:
            shard = coords[0]
            if shard not in done or self.every_chunk_written:
                return shard in done
            rows = self.shard_rows(shard)
            return len(self.done_record(shard)["skipped"]) < rows.stop - rows.start

        return required


def create_cache(
    path: str | Path,
    *,
    fingerprint: dict[str, Any],
    token_shape: tuple[int, int],
    num_views: int,
    shard_size: int,
    label_names: list[str],
    num_seen: int,
    labels: np.ndarray | Callable[[int, int], np.ndarray],
    paths: list[str],
    manifest_index: np.ndarray,
    visual_proj: np.ndarray,
) -> Cache:
    """Create an empty store (all metadata, no tokens), whole or not at all (`Location.building`).

    `labels`: the (N, C) int8 matrix, or a function (start, stop) -> those rows, called a shard at a
    time (it may not fit in memory: docs/design.md, section 2).
    """
    n = len(paths)
    assert manifest_index.shape == (n,)
    t, d = token_shape
    shard = min(shard_size, max(n, 1))
    with Location.of(path).building() as tmp:
        group = tmp.open_group("w")
        # each inner chunk is its raw bytes then their crc32c
        create_checked(
            group,
            "tokens",
            compress=False,
            shape=(n, num_views, t, d),
            dtype="float16",
            chunks=(1, 1, t, d),
            shards=(shard, num_views, t, d),
        )
        create_checked(group, "valid", shape=(n,), dtype="bool", chunks=(shard,), fill_value=False)
        _write_labels(group, labels, n, len(label_names), shard)
        one_chunk = (max(n, 1),)
        path_array = create_checked(group, "paths", shape=(n,), dtype=str, chunks=one_chunk)
        path_array[:] = np.asarray(paths, dtype=object)
        index_array = create_checked(
            group, "manifest_index", shape=(n,), dtype="int64", chunks=one_chunk
        )
        index_array[:] = manifest_index
        write_float32(group, "visual_proj", visual_proj)
        group.attrs.update(
            fingerprint=fingerprint,
            labels=list(label_names),
            num_seen=int(num_seen),
            shard_size=shard,
        )
        tmp.makedirs("done")
    return open_cache(path, mode="r+")


def _write_labels(
    group: zarr.Group,
    labels: np.ndarray | Callable[[int, int], np.ndarray],
    n: int,
    c: int,
    shard: int,
) -> None:
    """The (N, C) int8 `labels` array, written a shard at a time."""
    label_array = create_checked(
        group, "labels", shape=(n, c), dtype="int8", chunks=(shard, max(1, c))
    )
    for start in range(0, n, shard):
        stop = min(start + shard, n)
        rows = labels(start, stop) if callable(labels) else labels[start:stop]
        assert rows.shape == (stop - start, c), rows.shape
        label_array[start:stop] = rows


def write_float32(group: zarr.Group, name: str, a: np.ndarray) -> None:
    """A small float32 array, one chunk (with its crc32c)."""
    create_checked(group, name, shape=a.shape, dtype="float32", chunks=a.shape)[:] = a


def open_cache(path: str | Path, mode: str = "r") -> Cache:
    """Open a store written by `create_cache`; a missing or foreign store is one clear error."""
    location = Location.of(path)
    path = location.url
    if not location.exists("zarr.json"):
        raise QKSError("no feature cache here (run `qks extract` first)", path)
    try:
        group = location.open_group(mode)
        version = group.attrs["fingerprint"]["format_version"]
    except (KeyError, TypeError, ValueError) as e:
        raise QKSError(f"not a qks feature cache ({e})", path) from None
    if version not in READ_VERSIONS:
        raise QKSError(
            f"cache format version {version}, this qks reads versions {READ_VERSIONS}; rebuild it",
            path,
        )
    missing = [name for name in ARRAYS if name not in group]
    if missing:
        raise QKSError(
            f"damaged feature cache: no {', '.join(missing)} array; rebuild it (--overwrite)", path
        )
    return Cache(path, group)


def size_on_disk(path: str | Path) -> int:
    """Bytes of all files (objects) under `path`."""
    return Location.of(path).size()


def cache_summary(cache: Cache) -> dict[str, Any]:
    """What `qks cache info` prints: shapes, shards done, fingerprint summary, skipped, size."""
    backbone = cache.fingerprint.get("backbone", {})
    data = cache.fingerprint.get("data", {})
    num_labels = len(cache.label_names)
    num_unseen = num_labels - cache.num_seen
    done = len(cache.done_shards())
    return {
        "path": str(cache.path),
        "tokens": f"{cache.tokens.dtype} {tuple(cache.tokens.shape)} (images, views, tokens, dim)",
        "images": cache.num_images,
        "views": cache.num_views,
        "labels": f"{num_labels} ({cache.num_seen} seen, {num_unseen} unseen)",
        "shards": f"{done}/{cache.num_shards} done, {cache.shard_size} images each",
        "skipped": len(cache.skipped()),
        "model": describe_backbone(backbone),
        "data": ", ".join(f"{k}={str(v)[:16]}" for k, v in data.items()),
        "size_on_disk": f"{cache.location.size() / 2**20:.1f} MiB",
    }
