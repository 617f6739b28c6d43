"""What every sharded store shares (the feature store `Cache`, the query index): where it is, how
its rows fall into shards, and which shards are done (a marker under `done/` each, written after
the shard itself: docs/design.md, section 2)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import zarr

from qks_pipeline.store.location import Location


def done_marker(shard: int) -> str:
    """The key of a finished shard's done marker."""
    return f"done/{shard:05d}.json"


@dataclass
class ShardedStore:
    """An open store whose rows are written a shard at a time; a subclass says `num_images`."""

    # a local directory, or an fsspec URL
    path: Path | str
    group: zarr.Group
    # every shard done and every chunk there, checked once (`require_complete`)
    _complete: bool = field(default=False, init=False, repr=False)

    @functools.cached_property
    def location(self) -> Location:
        return Location.of(self.path)

    @property
    def num_images(self) -> int:
        raise NotImplementedError

    @property
    def shard_size(self) -> int:
        """Images per shard."""
        return int(self.group.attrs["shard_size"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_rows(self, shard: int) -> slice:
        start = shard * self.shard_size
        stop = min(start + self.shard_size, self.num_images)
        return slice(start, stop)

    def done_shards(self) -> set[int]:
        names = self.location.list("done")
        return {int(name[: -len(".json")]) for name in names if name.endswith(".json")}
