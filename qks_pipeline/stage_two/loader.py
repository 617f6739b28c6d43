"""Random minibatches from a feature cache, at the speed of the disk, with bounded memory.

Batches are rows drawn at random, read straight from the shard files
(`qks_pipeline.store.shard_reader`; why: docs/design.md, section 3): each epoch visits the shards in
a random order, `WINDOW` at a time, and draws batches from the permuted rows of a window (a batch
may span two). Each sample's view is drawn at random; everything random comes from (seed, epoch). In
order (validation, evaluation): the valid rows in store order, view 0. One background thread
assembles the next `prefetch` batches straight into the batch's tensor: pinned when the target is
CUDA (so `.to(device, non_blocking=True)` overlaps compute), else one of `prefetch + 2` reused
buffers.

Memory bound, in bytes (`CacheLoader.memory_bound_bytes`), whatever the size of the store:
    (prefetch + 2) x batch x T x D x 2 + 2 x WINDOW x S x C' + 32 MiB
for the batches queued, assembled and held by the caller; the labels of two windows (S images a
shard, C' label columns); the reader thread, zarr's buffers and the open shards' indexes. ViT-B/16,
batch 64, prefetch 2, 925 seen labels: 4 x 19.4 MB + 16 x 0.95 MB + 32 MiB = 120 MiB
(`benchmarks/bench_train_memory.py` measured 72-101 MiB).
"""

from __future__ import annotations

import functools
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qks_pipeline.store.features import Cache
from qks_pipeline.store.shard_reader import Reader, open_reader

WINDOW = 8  # shards whose rows are drawn from together
PREFETCH = 2  # batches assembled ahead by the background thread
# bytes for the reader thread, zarr's buffers decoding a label chunk and the open shards' indexes
OVERHEAD = 32 * 2**20


@dataclass
class Batch:
    """One batch of a `CacheLoader`."""

    tokens: torch.Tensor  # (B, T, D) float16, pinned when the loader targets CUDA
    labels: torch.Tensor  # (B, C') int8 over the selected label columns
    rows: np.ndarray  # (B,) int64 store rows, ascending


@dataclass
class CacheLoader:
    """Batches of (tokens, labels) over the valid rows of a row range of one store.

    Build one with `open_loader`.
    """

    cache: Cache
    reader: Reader
    rows: np.ndarray  # (n,) int64 the valid rows in the range, ascending
    row_range: tuple[int, int]
    batch_size: int
    # the label columns of the batches (train: seen labels)
    columns: slice = field(default_factory=lambda: slice(None))
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    prefetch: int = PREFETCH
    pin_memory: bool = False  # assemble batches in pinned memory (when they go to a CUDA device)
    # (rank, ranks): this rank reads its share of each batch only (stage_two/data_parallel.py)
    part: tuple[int, int] = (0, 1)
    # shard -> its labels (S, C'), oldest first
    _labels: dict[int, np.ndarray] = field(default_factory=dict)
    # (buffer, its last batch's weakref)
    _buffers: list[tuple[np.ndarray, Callable]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @functools.cached_property
    def num_columns(self) -> int:
        return len(range(*self.columns.indices(len(self.cache.label_names))))

    @functools.cached_property
    def token_shape(self) -> tuple[int, int]:
        # (T, D); each look-up of `cache.tokens` reads the array's metadata
        return self.cache.tokens.shape[2:]

    @property
    def memory_bound_bytes(self) -> int:
        """Upper bound on the bytes the loader holds at once (see the module docstring)."""
        t, d = self.token_shape
        labels = 2 * WINDOW * self.cache.shard_size * self.num_columns
        return (self.prefetch + 2) * self.batch_size * t * d * 2 + labels + OVERHEAD

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, views) of one epoch, in the order the batches take them."""
        if not self.shuffle:
            return self.rows, np.zeros_like(self.rows)
        rng = np.random.default_rng([self.seed, epoch])
        shard_rank = rng.permutation(self.cache.num_shards)
        # (n,) the window each row falls in
        window = shard_rank[self.rows // self.cache.shard_size] // WINDOW
        # window by window, permuted within
        within = rng.random(len(self.rows))
        rows = self.rows[np.lexsort((within, window))]
        return rows, rng.integers(self.cache.num_views, size=len(rows))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """One epoch's batches: each valid row once (but a last partial batch with `drop_last`)."""
        rows, views = self.order(epoch)
        stop = len(rows) - len(rows) % self.batch_size if self.drop_last else len(rows)
        with ThreadPoolExecutor(1, thread_name_prefix="qks-loader") as pool:
            pending: deque = deque()
            try:
                for start in range(0, stop, self.batch_size):
                    n = min(self.batch_size, stop - start)
                    rank, ranks = self.part
                    # this rank's share of the batch's n rows
                    part = slice(start + n * rank // ranks, start + n * (rank + 1) // ranks)
                    pending.append(pool.submit(self._batch, rows[part], views[part]))
                    if len(pending) > self.prefetch:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _batch(self, rows: np.ndarray, views: np.ndarray) -> Batch:
        """Read one batch in the background thread, rows ascending (forward through each shard)."""
        ascending = np.argsort(rows)
        rows = rows[ascending]
        views = views[ascending]
        tokens = self._tokens(len(rows))
        self.reader.read(rows, views, tokens.numpy())
        return Batch(tokens, torch.from_numpy(self._gather_labels(rows)), rows)

    def _tokens(self, n: int) -> torch.Tensor:
        """A (n, T, D) float16 tensor to read a batch into.

        Pinned: from torch's caching host allocator, which reuses a block once the copies from it
        are done. Else one of `prefetch + 2` buffers that no batch (nor view of one) refers to any
        more: fresh memory costs a page fault per 4 KiB, which made reads 3-4x slower here.
        """
        shape = (n, *self.token_shape)
        if self.pin_memory:
            return torch.empty(shape, dtype=torch.float16, pin_memory=True)
        free = next((i for i, (_, batch) in enumerate(self._buffers) if batch() is None), None)
        if free is None and len(self._buffers) == self.prefetch + 2:  # the caller keeps its batches
            return torch.empty(shape, dtype=torch.float16)
        if free is None:
            free = len(self._buffers)
            buffer = np.empty((self.batch_size, *shape[1:]), np.float16)
            self._buffers.append((buffer, lambda: None))
        # a tensor of it holds it: it lives as long as any batch or view of one
        view = self._buffers[free][0][:n]
        self._buffers[free] = (self._buffers[free][0], weakref.ref(view))
        return torch.from_numpy(view)

    def _gather_labels(self, rows: np.ndarray) -> np.ndarray:
        """Labels (B, C') of `rows`, from their shards' labels; those of two windows are kept."""
        size = self.cache.shard_size
        shards = rows // size
        out = np.empty((len(rows), self.num_columns), np.int8)
        for shard in np.unique(shards).tolist():
            if shard not in self._labels:
                # keep the labels of two windows (in order: of one shard)
                if len(self._labels) >= (2 * WINDOW if self.shuffle else 1):
                    del self._labels[next(iter(self._labels))]
                shard_rows = slice(shard * size, (shard + 1) * size)
                self._labels[shard] = self.cache.labels[shard_rows, self.columns]  # (S, C')
            pick = shards == shard
            out[pick] = self._labels[shard][rows[pick] - shard * size]
        return out


def split_rows(num_rows: int, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train, validation) row ranges; validation is the tail (random: the store is shuffled)."""
    n_val = int(round(num_rows * val_fraction))
    return (0, num_rows - n_val), (num_rows - n_val, num_rows)


def open_loader(
    cache: Cache, *, rows: tuple[int, int] | None = None, backend: str = "auto", **options: Any
) -> CacheLoader:
    """A loader over the valid rows in `rows` (default: all) of a complete store.

    `options` are the other `CacheLoader` fields (`batch_size`, `columns`, ...); `backend` says how
    tokens are read (`qks_pipeline.store.shard_reader.open_reader`). A shard not done or a chunk
    missing is refused here (`Cache.require_complete`, once per store), a damaged chunk when read.
    """
    cache.require_complete()
    start, stop = rows if rows is not None else (0, cache.num_images)
    valid = np.asarray(cache.valid[start:stop], dtype=bool)
    valid_rows = (start + np.flatnonzero(valid)).astype(np.int64)
    reader = open_reader(cache.location, cache.tokens, backend, cache.every_chunk_written)
    return CacheLoader(cache, reader, valid_rows, (start, stop), **options)
