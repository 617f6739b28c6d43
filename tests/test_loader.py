"""The block loader: coverage, validity, determinism, views, row ranges, both read backends."""

from __future__ import annotations

import time
import weakref

import numpy as np
import pytest
from synthetic import make_synthetic

from qks_pipeline.cache import open_cache
from qks_pipeline.loader import _block_bounds, open_loader, split_rows

BACKENDS = ["zarr", pytest.param("tensorstore", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorstore") is None, reason="tensorstore not installed"))]  # fmt: skip
INVALID = (3, 64, 65, 150)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return make_synthetic(root, num_train=200, num_test=16, views=3, shard_size=64, invalid_train=INVALID)


def _rows(loader, epoch):
    return np.concatenate([b.rows for b in loader.epoch(epoch)])


def _small(cache, **kw):
    kw = {"batch_size": 16, "block_size": 32, "buffer_blocks": 2, "prefetch": 1, "seed": 7} | kw
    return open_loader(cache, **kw)


def test_block_bounds_never_span_shards():
    assert _block_bounds(10, 150, 32, 64) == [(10, 32), (32, 64), (64, 96), (96, 128), (128, 150)]
    assert _block_bounds(0, 100, 48, 64) == [(0, 48), (48, 64), (64, 96), (96, 100)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_covers_each_valid_row_once(data, backend):
    cache = open_cache(data.train)
    loader = _small(cache, backend=backend)
    rows = _rows(loader, 0)
    expected = np.setdiff1d(np.arange(200), INVALID)
    assert len(rows) == len(expected) == loader.num_samples
    np.testing.assert_array_equal(np.sort(rows), expected)
    assert len(list(loader.epoch(0))) == len(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_carry_the_stored_values(data, backend):
    cache = open_cache(data.train)
    loader = _small(cache, backend=backend, columns=slice(0, data.num_seen))
    tokens, labels = cache.tokens[:], cache.group["labels"][:]
    views = set()
    for batch in loader.epoch(1):
        assert batch.tokens.dtype.is_floating_point and batch.tokens.element_size() == 2
        assert batch.labels.shape == (len(batch.rows), data.num_seen)
        np.testing.assert_array_equal(batch.labels.numpy(), labels[batch.rows, : data.num_seen])
        for i, row in enumerate(batch.rows):  # each sample is one of the row's stored views
            match = [v for v in range(3) if np.array_equal(batch.tokens[i].numpy(), tokens[row, v])]
            assert len(match) == 1
            views.add(match[0])
    assert views == {0, 1, 2}


def test_deterministic_per_seed_and_epoch(data):
    cache = open_cache(data.train)
    a, b = _small(cache), _small(cache)
    np.testing.assert_array_equal(_rows(a, 3), _rows(b, 3))
    assert not np.array_equal(_rows(a, 3), _rows(a, 4))
    assert not np.array_equal(_rows(a, 3), _rows(_small(cache, seed=8), 3))
    first = next(iter(a.epoch(5))).tokens
    assert np.array_equal(first.numpy(), next(iter(b.epoch(5))).tokens.numpy())


def test_shuffle_mixes_blocks(data):
    """A batch draws from several blocks of the buffer, not from one block at a time."""
    loader = _small(open_cache(data.train), block_size=32, buffer_blocks=4)
    first = next(iter(loader.epoch(0))).rows
    assert len(np.unique(first // 32)) > 1


def test_row_range_and_in_order(data):
    cache = open_cache(data.train)
    train, val = split_rows(cache.num_images, 0.25)
    assert train == (0, 150) and val == (150, 200)
    loader = _small(cache, rows=val, shuffle=False)
    rows = _rows(loader, 0)
    np.testing.assert_array_equal(rows, np.setdiff1d(np.arange(150, 200), INVALID))  # in store order
    batch = next(iter(loader.epoch(0)))
    np.testing.assert_array_equal(batch.tokens.numpy(), cache.tokens[batch.rows, 0])  # view 0 when not shuffling
    assert np.intersect1d(_rows(_small(cache, rows=train), 0), rows).size == 0


def test_drop_last_and_early_break(data):
    loader = _small(open_cache(data.train), batch_size=50, drop_last=True)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == loader.num_samples // 50
    assert all(len(b.rows) == 50 for b in batches)
    for _ in loader.epoch(1):  # leaving an epoch early stops its reader thread
        break


def test_blocks_held_are_bounded(data):
    """Besides its fixed shuffle buffer, the loader holds at most prefetch + 2 blocks (queue, reader, consumer)."""
    loader = _small(open_cache(data.train), prefetch=1, block_size=16, buffer_blocks=2, batch_size=4)
    alive, peak, read = [0], [0], loader.reader

    def counting_reader(*args):
        block = read(*args)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(block.tokens, lambda: alive.__setitem__(0, alive[0] - 1))
        return block

    loader.reader = counting_reader
    for _ in loader.epoch(0):
        time.sleep(0.002)  # let the reader run ahead until the queue is full
    assert 1 <= peak[0] <= loader.prefetch + 2
    t, d = 10, 32
    assert loader.memory_bound_bytes == ((2 + 1 + 4) * 16 + 2 * 4) * t * d * 2
