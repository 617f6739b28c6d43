"""Random minibatches from a feature cache, read in contiguous blocks, with bounded memory.

Random access into a sharded store is slow (zarr-python `oindex`: under 100 images/s here), contiguous reads are fast
(thousands of images/s), and stage one writes training stores in a seeded random order, so contiguous rows are already
a random sample. Each epoch therefore visits blocks of contiguous rows (aligned to `block_size` and to the shards) in a
random order; a background thread reads the next blocks while the model computes (zarr and TensorStore release the GIL
during I/O); a shuffle buffer of `buffer_blocks` blocks mixes samples across blocks; batches are drawn from it.

Memory bound, in token bytes (`CacheLoader.memory_bound_bytes`), whatever the size of the store:
    (buffer_blocks + prefetch + 4) x block_size x T x D x 2 bytes + 2 batches
i.e. the shuffle buffer, the blocks waiting in the prefetch queue, the block being consumed, the block the reader thread
holds while the queue is full, and two blocks for the reader's transient decode buffers (measured by
benchmarks/bench_train_memory.py: about 0.6 block with TensorStore, 1.7 with zarr-python); plus the batch being made
and the one the caller still holds. For ViT-B/16 (T=197, D=768) with the defaults (256-row blocks, 4-block buffer,
prefetch 2) and batch 64: 10 x 77.5 MB + 2 x 19.4 MB = 814 MB.

Everything random (block order, the view drawn per sample, the buffer draws) comes from (seed, epoch): a given epoch is
the same on every run, and different epochs differ.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from qks_pipeline.cache import Cache
from qks_pipeline.errors import QKSError

BLOCK_SIZE = 256  # rows per contiguous read
BUFFER_BLOCKS = 4  # shuffle-buffer capacity, in blocks
PREFETCH = 2  # blocks read ahead by the background thread

try:
    import tensorstore
except ImportError:  # optional: zarr-python reads the same store, slower when each sample picks its own view
    tensorstore = None


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T, D) float16
    labels: torch.Tensor  # (B, C') int8 over the selected label columns
    rows: np.ndarray  # (B,) int64 store rows


@dataclass
class _Block:
    tokens: np.ndarray  # (n, T, D) float16, valid rows only
    labels: np.ndarray  # (n, C') int8
    rows: np.ndarray  # (n,) int64


BlockReader = Callable[[int, int, np.ndarray, np.ndarray], _Block]


def _zarr_reader(cache: Cache, columns: slice) -> BlockReader:
    token_array, label_array = cache.tokens, cache.group["labels"]  # opened once: each lookup reads metadata

    def read(start: int, stop: int, rows: np.ndarray, views: np.ndarray) -> _Block:
        labels = label_array[start:stop, columns]  # (stop - start, C')
        if len(rows) == stop - start and not views.any():
            return _Block(token_array[start:stop, 0], labels, rows)  # (n, T, D)
        local = rows - start
        tokens = np.empty((len(rows), *token_array.shape[2:]), dtype=np.float16)  # (n, T, D)
        for v in np.unique(views):  # one contiguous read per view present in the block
            pick = views == v
            tokens[pick] = token_array[start:stop, int(v)][local[pick]]
        return _Block(tokens, labels[local], rows)

    return read


def _tensorstore_reader(cache: Cache, columns: slice) -> BlockReader:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(cache.path / "tokens")}}
    store = tensorstore.open(spec, read=True).result()
    label_array = cache.group["labels"]

    def read(start: int, stop: int, rows: np.ndarray, views: np.ndarray) -> _Block:
        if len(rows) == stop - start and not views.any():
            tokens = store[start:stop, 0].read().result()  # (n, T, D)
        else:
            tokens = store[tensorstore.d[0, 1].vindex[rows, views]].read().result()  # (n, T, D)
        return _Block(tokens, label_array[start:stop, columns][rows - start], rows)

    return read


@dataclass
class CacheLoader:
    """Batches of (tokens, labels) over the valid rows of a row range of one store. Build with `open_loader`."""

    reader: BlockReader
    blocks: list[tuple[int, int, np.ndarray]]  # (start, stop, valid rows) per block, in store order
    row_range: tuple[int, int]
    num_views: int
    sample_bytes: int  # T x D x 2
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    block_size: int = BLOCK_SIZE
    buffer_blocks: int = BUFFER_BLOCKS
    prefetch: int = PREFETCH

    @property
    def num_samples(self) -> int:
        return sum(len(rows) for _, _, rows in self.blocks)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def memory_bound_bytes(self) -> int:
        """Upper bound on the token bytes the loader holds at once (see the module docstring)."""
        blocks = self.buffer_blocks + self.prefetch + 4
        return (blocks * self.block_size + 2 * self.batch_size) * self.sample_bytes

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch: every valid row exactly once (but the last partial batch with `drop_last`)."""
        order = np.arange(len(self.blocks))
        views = np.zeros(self.row_range[1] - self.row_range[0], dtype=np.int64)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.blocks))
            if self.num_views > 1:
                views = np.random.default_rng([self.seed, epoch, 1]).integers(self.num_views, size=len(views))
        stream = _Prefetcher(self.reader, [self.blocks[i] for i in order], views, self.row_range[0], self.prefetch)
        try:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, 2])
                capacity = self.buffer_blocks * self.block_size
                yield from _shuffled(stream, capacity, self.batch_size, rng, self.drop_last)
            else:
                yield from _in_order(stream, self.batch_size, self.drop_last)
        finally:
            stream.close()


def _block_bounds(start: int, stop: int, block_size: int, shard_size: int) -> list[tuple[int, int]]:
    """Split [start, stop) at multiples of `block_size` and of `shard_size` (a block never spans two shards)."""
    cuts = {start, stop}
    cuts |= set(range(-(-start // block_size) * block_size, stop, block_size))
    cuts |= set(range(-(-start // shard_size) * shard_size, stop, shard_size))
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:], strict=False))


def split_rows(num_rows: int, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train, validation) row ranges: the validation split is the contiguous tail (random: the store is shuffled)."""
    n_val = int(round(num_rows * val_fraction))
    return (0, num_rows - n_val), (num_rows - n_val, num_rows)


def open_loader(
    cache: Cache,
    *,
    batch_size: int,
    rows: tuple[int, int] | None = None,
    columns: slice = slice(None),
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    block_size: int = BLOCK_SIZE,
    buffer_blocks: int = BUFFER_BLOCKS,
    prefetch: int = PREFETCH,
    backend: str = "auto",
) -> CacheLoader:
    """A loader over the valid rows in `rows` (default: all) and the label `columns` (train: the seen labels).

    Args:
        backend: "tensorstore", "zarr", or "auto" (TensorStore when installed and the store is local; zarr-python for a
            store URL such as s3://..., which it reads through fsspec with the filesystem's own configuration).
    """
    start, stop = rows if rows is not None else (0, cache.num_images)
    valid = np.asarray(cache.group["valid"][start:stop], dtype=bool)
    blocks = []
    for a, b in _block_bounds(start, stop, block_size, cache.shard_size):
        kept = a + np.flatnonzero(valid[a - start : b - start])
        if len(kept):
            blocks.append((a, b, kept.astype(np.int64)))
    if backend == "tensorstore" and not cache.location.local:
        raise QKSError("the tensorstore backend reads local stores only; use the zarr backend for a URL", cache.path)
    use_ts = backend == "tensorstore" or (backend == "auto" and tensorstore is not None and cache.location.local)
    reader = _tensorstore_reader(cache, columns) if use_ts else _zarr_reader(cache, columns)
    t, d = cache.tokens.shape[2:]
    return CacheLoader(
        reader, blocks, (start, stop), cache.num_views, t * d * 2, batch_size, seed, shuffle, drop_last,
        block_size, buffer_blocks, prefetch,
    )  # fmt: skip


class _Prefetcher:
    """Reads blocks in a background thread, at most `depth` ahead; iterate to receive them in order."""

    _END = object()

    def __init__(self, reader: BlockReader, blocks: list, views: np.ndarray, offset: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(reader, blocks, views, offset), daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, reader: BlockReader, blocks: list, views: np.ndarray, offset: int) -> None:
        try:
            for start, stop, rows in blocks:
                if not self._put(reader(start, stop, rows, views[rows - offset])):
                    return
            self._put(self._END)
        except Exception as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> Iterator[_Block]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Samples:
    """A stream of samples cut from a stream of blocks."""

    def __init__(self, blocks: Iterator[_Block]):
        self._blocks = iter(blocks)
        self._current: _Block | None = None
        self._pos = 0

    def peek(self) -> _Block | None:
        """The block the next sample comes from (None at the end of the stream)."""
        if self._current is None or self._pos == len(self._current.rows):
            self._current, self._pos = next(self._blocks, None), 0
        return self._current

    def take(self, k: int) -> _Block | None:
        """Up to k samples as one block (None at the end of the stream)."""
        parts = []
        while k > 0 and (block := self.peek()) is not None:
            cut = slice(self._pos, min(self._pos + k, len(block.rows)))
            parts.append(_Block(block.tokens[cut], block.labels[cut], block.rows[cut]))
            self._pos, k = cut.stop, k - (cut.stop - cut.start)
        if len(parts) <= 1:
            return parts[0] if parts else None
        return _Block(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("tokens", "labels", "rows")))

    def fill(self, pool: list[np.ndarray], slots: np.ndarray) -> int:
        """Copy the next samples straight into `pool` (tokens, labels, rows) at `slots`; returns how many."""
        filled = 0
        while filled < len(slots) and (block := self.peek()) is not None:
            m = min(len(slots) - filled, len(block.rows) - self._pos)
            dst, src = slots[filled : filled + m], slice(self._pos, self._pos + m)
            for p, a in zip(pool, (block.tokens, block.labels, block.rows), strict=True):
                p[dst] = a[src]
            self._pos, filled = self._pos + m, filled + m
        return filled


def _to_batch(tokens: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> Batch:
    return Batch(torch.from_numpy(np.ascontiguousarray(tokens)), torch.from_numpy(np.ascontiguousarray(labels)), rows)


def _in_order(stream: Iterator[_Block], batch_size: int, drop_last: bool) -> Iterator[Batch]:
    samples = _Samples(stream)
    while (block := samples.take(batch_size)) is not None:
        if drop_last and len(block.rows) < batch_size:
            return
        yield _to_batch(block.tokens, block.labels, block.rows)


def _shuffled(stream: Iterator[_Block], capacity: int, batch_size: int, rng: np.random.Generator,
              drop_last: bool) -> Iterator[Batch]:  # fmt: skip
    """Shuffle buffer: draw a random batch from the pool, refill the freed slots from the stream, compact at the end."""
    samples = _Samples(stream)
    if (first := samples.peek()) is None:
        return
    pool = [np.empty((capacity, *a.shape[1:]), a.dtype) for a in (first.tokens, first.labels, first.rows)]
    del first  # hold no block beyond the one `samples` is consuming
    n = samples.fill(pool, np.arange(capacity))
    while n > 0:
        k = min(batch_size, n)
        if drop_last and k < batch_size:
            return
        slots = rng.choice(n, size=k, replace=False)
        batch = _to_batch(*(p[slots] for p in pool))  # fancy indexing copies out of the pool
        holes = slots[samples.fill(pool, slots) :]  # refilled from the stream in order; the rest stay empty
        if len(holes):  # the stream ran dry: move tail samples into the holes below the new end
            n_new = n - len(holes)
            low = holes[holes < n_new]
            tail = np.setdiff1d(np.arange(n_new, n), holes)
            for p in pool:
                p[low] = p[tail]
            n = n_new
        yield batch
