"""The loader and the direct shard reader: zarr-python equality, damage, coverage, views, memory."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.loader import OVERHEAD, WINDOW, open_loader, split_rows
from qks_pipeline.store import shard_reader as shards
from qks_pipeline.store.features import open_cache
from qks_pipeline.store.shard_reader import ArrayReader, ShardReader, open_reader
from qks_pipeline.store.synthetic import make_synthetic
from qks_pipeline.store.verify import verify_cache

BACKENDS = ["direct", "tensorstore", "zarr"]
INVALID = (3, 64, 65, 150)
N, V, S = 200, 3, 64  # rows, views, shard size: the last shard holds 8 rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return make_synthetic(
        root, num_train=N, num_test=16, views=V, shard_size=S, invalid_train=INVALID
    )


def _relayout(src, dst, serializer=None, compressors=None):
    """A copy of the store `src` with tokens rewritten in other codecs, zarr's way: no chunk equal
    to the fill value (format version 2, or 1 without the inner chunks' crc32c)."""
    shutil.copytree(src, dst)
    group = zarr.open_group(dst, mode="r+")
    version = 2 if serializer else 1
    group.attrs["fingerprint"] = {**group.attrs["fingerprint"], "format_version": version}
    tokens = group["tokens"][:]
    del group["tokens"]
    chunks = (S, *tokens.shape[1:]) if serializer else (1, 1, *tokens.shape[2:])
    shards = None if serializer else (S, *tokens.shape[1:])
    kw = {"serializer": serializer} if serializer else {}
    array = group.create_array(
        "tokens",
        shape=tokens.shape,
        dtype="float16",
        chunks=chunks,
        shards=shards,
        compressors=compressors,
        **kw,
    )
    array[:] = tokens
    return dst


def _all(reader, cache):
    rows, views = (
        np.repeat(np.arange(cache.num_images), cache.num_views),
        np.tile(np.arange(cache.num_views), N),
    )
    out = np.empty((len(rows), *cache.tokens.shape[2:]), np.float16)
    reader.read(rows, views, out)
    return out.reshape(cache.tokens.shape)


def test_direct_reader_equals_zarr_on_every_layout(data, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "OPEN_SHARDS", 1)  # a read spanning more shards than are kept open
    index_first = ShardingCodec(
        chunk_shape=(1, 1, 10, 32), codecs=[BytesCodec(), Crc32cCodec()], index_location="start"
    )
    stores = {
        "v2 (chunk crc32c)": data.train,
        "v1 (no chunk crc32c)": _relayout(data.train, tmp_path / "v1.zarr"),
        "index at the start": _relayout(
            data.train, tmp_path / "start.zarr", serializer=index_first
        ),
    }
    for name, store in stores.items():
        cache = open_cache(store)
        reader = open_reader(cache.location, cache.tokens)
        assert isinstance(reader, ShardReader), name
        assert reader.chunk_crc == (name != "v1 (no chunk crc32c)") and reader.index_at_start == (
            name == "index at the start"
        )
        expected = cache.tokens[:]  # zarr-python; invalid rows are absent chunks: zeros
        assert not expected[list(INVALID)].any()
        np.testing.assert_array_equal(
            _all(reader, cache).view(np.uint16), expected.view(np.uint16), err_msg=name
        )
    compressed = open_cache(
        _relayout(data.train, tmp_path / "zstd.zarr", compressors=[zarr.codecs.ZstdCodec()])
    )
    # not read directly
    assert isinstance(open_reader(compressed.location, compressed.tokens), ArrayReader)


def _shard_file(store, shard):
    return store / "tokens" / "c" / str(shard) / "0" / "0" / "0"


def damage(store, kind: str, row: int = 70, view: int = 0):
    """Damage the shard file holding `row`: its index, its length, or one bit of (row, view)."""
    path = _shard_file(store, row // S)
    raw = bytearray(path.read_bytes())
    # (offset, nbytes)
    index = np.frombuffer(bytes(raw[-(S * V * 16 + 4) : -4]), "<u8").reshape(S, V, 2)
    if kind == "index":
        # the offset of the row's first chunk
        raw[-(S * V * 16 + 4) + 16 * V * (row % S) + 3] ^= 0x10
    elif kind == "truncated":
        del raw[len(raw) // 2 :]
    else:
        raw[int(index[row % S, view, 0]) + 101] ^= 0x01  # the lowest bit of one byte of one float16
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("kind", ["index", "truncated", "bit"])
def test_damage_is_one_error_line_naming_shard_and_row(data, tmp_path, kind):
    store = shutil.copytree(data.train, tmp_path / "t.zarr")
    path = damage(store, kind)
    loader = open_loader(open_cache(store), batch_size=16, shuffle=False, backend="direct")
    with pytest.raises(QKSError) as e:
        list(loader.epoch(0))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: row ") and "corrupt" in message
    if kind == "bit":
        assert message.endswith(": row 70 view 0: chunk checksum mismatch (corrupt shard file)")


def test_a_store_without_checksums_still_reads_and_verifies(data, tmp_path):
    v1 = open_cache(_relayout(data.train, tmp_path / "v1.zarr"))
    loader = open_loader(v1, batch_size=16, shuffle=False)
    assert isinstance(loader.reader, ShardReader) and not loader.reader.chunk_crc
    batch = next(iter(loader.epoch(0)))
    np.testing.assert_array_equal(batch.tokens.numpy(), v1.tokens[batch.rows, 0])
    assert verify_cache(v1) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deleted_shard_file_is_never_read_as_zeros(data, tmp_path, backend):
    store = shutil.copytree(data.train, tmp_path / "t.zarr")
    path = _shard_file(store, 1)
    path.unlink()
    with pytest.raises(QKSError, match="chunk missing") as e:
        open_loader(open_cache(store), batch_size=16, backend=backend)
    assert str(e.value).startswith(f"{path}: chunk missing")


def test_the_direct_reader_refuses_a_shard_file_gone_after_opening(data, tmp_path):
    """The loader checked every file at opening; a file deleted later is refused when read."""
    store = shutil.copytree(data.train, tmp_path / "t.zarr")
    loader = open_loader(open_cache(store), batch_size=16, shuffle=False, backend="direct")
    _shard_file(store, 2).unlink()
    with pytest.raises(QKSError, match=r"row 128: shard file missing; the store is damaged"):
        list(loader.epoch(0))


def test_a_chunk_missing_from_a_shard_file_is_damage(data, tmp_path):
    """An index entry saying 'absent' (as zarr writes for a chunk equal to the fill value, which
    version 3 never omits), its checksum recomputed, is refused rather than read as zeros."""
    import google_crc32c

    store = shutil.copytree(data.train, tmp_path / "t.zarr")
    path = _shard_file(store, 1)
    raw = bytearray(path.read_bytes())
    start = len(raw) - (S * V * 16 + 4)
    index = np.frombuffer(bytes(raw[start:-4]), "<u8").copy().reshape(S, V, 2)
    # row 70, view 1
    index[70 % S, 1] = 2**64 - 1
    raw[start:-4] = index.tobytes()
    raw[-4:] = google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    loader = open_loader(open_cache(store), batch_size=16, shuffle=False, backend="direct")
    with pytest.raises(QKSError) as e:
        list(loader.epoch(0))
    assert str(e.value) == (
        f"{path}: row 70 view 1: chunk missing from the shard file; the store is damaged; "
        "rebuild it"
    )


def test_a_damaged_labels_chunk_stops_the_loader_naming_it(data, tmp_path):
    store = shutil.copytree(data.train, tmp_path / "t.zarr")
    chunk = store / "labels" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[-5] ^= 0x01
    chunk.write_bytes(bytes(raw))
    loader = open_loader(open_cache(store), batch_size=16, shuffle=False)
    with pytest.raises(QKSError) as e:
        list(loader.epoch(0))
    assert str(e.value).startswith(f"{chunk}: chunk unreadable: crc32c checksum mismatch")


def _rows(loader, epoch):
    return np.concatenate([b.rows for b in loader.epoch(epoch)])


def _small(cache, **kw):
    return open_loader(cache, **({"batch_size": 16, "prefetch": 1, "seed": 7} | kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_covers_each_valid_row_once(data, backend):
    loader = _small(open_cache(data.train), backend=backend)
    rows = _rows(loader, 0)
    expected = np.setdiff1d(np.arange(N), INVALID)
    assert len(rows) == len(expected) == loader.num_samples
    np.testing.assert_array_equal(np.sort(rows), expected)
    assert len(list(loader.epoch(0))) == len(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_carry_the_stored_values(data, backend):
    cache = open_cache(data.train)
    loader = _small(cache, backend=backend, columns=slice(0, data.num_seen))
    tokens, labels = cache.tokens[:], cache.labels[:]
    views = set()
    for batch in loader.epoch(1):
        assert batch.tokens.dtype.is_floating_point and batch.tokens.element_size() == 2
        np.testing.assert_array_equal(batch.labels.numpy(), labels[batch.rows, : data.num_seen])
        for i, row in enumerate(batch.rows):  # each sample is one of the row's stored views
            match = [v for v in range(V) if np.array_equal(batch.tokens[i].numpy(), tokens[row, v])]
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


def test_batches_are_random_rows_of_a_window_of_shards(data):
    """A batch draws from all over its window (here all 4 shards), not from a run of rows."""
    loader = _small(open_cache(data.train), batch_size=32)
    assert open_cache(data.train).num_shards <= WINDOW
    spans = [np.unique(b.rows // S).size for b in loader.epoch(0)]
    assert min(spans[:-1]) >= 3


def test_row_range_and_in_order(data):
    cache = open_cache(data.train)
    train, val = split_rows(cache.num_images, 0.25)
    assert train == (0, 150) and val == (150, 200)
    loader = _small(cache, rows=val, shuffle=False)
    rows = _rows(loader, 0)
    # in store order
    np.testing.assert_array_equal(rows, np.setdiff1d(np.arange(150, 200), INVALID))
    batch = next(iter(loader.epoch(0)))
    # view 0 when not shuffling
    np.testing.assert_array_equal(batch.tokens.numpy(), cache.tokens[batch.rows, 0])
    assert np.intersect1d(_rows(_small(cache, rows=train), 0), rows).size == 0


def test_drop_last_and_early_break(data):
    loader = _small(open_cache(data.train), batch_size=50, drop_last=True)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == loader.num_samples // 50
    assert all(len(b.rows) == 50 for b in batches)
    for _ in loader.epoch(1):  # leaving an epoch early stops its reader thread
        break


def test_buffers_are_reused_and_bounded_but_never_under_a_held_batch(data):
    cache = open_cache(data.train)
    loader = _small(cache, batch_size=8, shuffle=False)
    # each batch dropped when the next comes
    reused = {batch.tokens.data_ptr() for batch in loader.epoch(0)}
    assert len(reused) <= loader.prefetch + 2 < len(loader)
    kept = list(loader.epoch(0))
    # a view of a batch holds its buffer too
    views = [(b.rows[0], b.tokens[0]) for b in loader.epoch(0)]
    tokens = cache.tokens[:, 0]
    for batch in kept:
        np.testing.assert_array_equal(batch.tokens.numpy(), tokens[batch.rows])
    for row, sample in views:
        np.testing.assert_array_equal(sample.numpy(), tokens[row])
    assert len(loader._buffers) == loader.prefetch + 2
    t, d, columns = 10, 32, 12
    assert (
        loader.memory_bound_bytes == (1 + 2) * 8 * t * d * 2 + 2 * WINDOW * S * columns + OVERHEAD
    )
