"""`qks cache verify`: every problem of a feature store, read back in full."""

from __future__ import annotations

import numpy as np

from qks_pipeline.errors import QKSError
from qks_pipeline.store.features import Cache
from qks_pipeline.store.shard_reader import Reader, open_reader

# rows read at a time by `verify_cache`
VERIFY_ROWS = 64


def _verify_shard(cache: Cache, reader: Reader, shard: int, paths: np.ndarray) -> list[str]:
    """The problems of one shard with a done marker."""
    rows = cache.shard_rows(shard)
    record = cache.done_record(shard)
    if record.get("rows") != [rows.start, rows.stop]:
        return [f"shard {shard}: marker rows {record.get('rows')} != {[rows.start, rows.stop]}"]
    valid = cache.valid[rows]
    problems = []
    skipped = {s["path"] for s in record["skipped"]}
    invalid = set(paths[rows][~valid].tolist())
    if invalid != skipped:
        problems.append(
            f"shard {shard}: {len(invalid)} rows not valid "
            f"but {len(skipped)} images recorded as skipped"
        )
    v = cache.num_views
    sample_shape = cache.tokens.shape[2:]
    # a piece at a time: a shard can be GBs
    for start in range(rows.start, rows.stop, VERIFY_ROWS):
        n = min(VERIFY_ROWS, rows.stop - start)
        # (n x V, T, D)
        tokens = np.empty((n * v, *sample_shape), np.float16)
        sample_rows = np.repeat(np.arange(start, start + n), v)
        views = np.tile(np.arange(v), n)
        try:
            reader.read(sample_rows, views, tokens)
        except QKSError as e:
            return [*problems, f"shard {shard}: {e}"]
        # a damaged shard surfaces as any of zarr's, TensorStore's or numcodecs' errors
        except Exception as e:
            return [*problems, f"shard {shard}: unreadable ({type(e).__name__}: {e})"]
        # (n, V x T x D)
        tokens = tokens.reshape(n, -1)
        offset = start - rows.start
        ok = valid[offset : offset + n]
        for i in start + np.flatnonzero(ok & ~tokens.any(axis=1)):
            problems.append(f"shard {shard}: row {i} ({paths[i]}) is valid but all zero")
        if not np.isfinite(tokens[ok]).all():
            problems.append(f"shard {shard}: non-finite tokens in rows {start}-{start + n - 1}")
    return problems


def verify_cache(cache: Cache) -> list[str]:
    """Every problem of a store, read back in full.

    Missing or inconsistent done markers, damaged shards (every chunk's checksum from format
    version 2 on), valid/skipped mismatches, valid rows of zeros.
    """
    done = cache.done_shards()
    shards = set(range(cache.num_shards))
    problems = [f"shard {s}: no done marker (not extracted)" for s in sorted(shards - done)]
    problems += [
        f"done marker {s:05d}.json names no shard of this store" for s in sorted(done - shards)
    ]
    paths = cache.paths[:]
    reader = open_reader(cache.location, cache.tokens)
    for shard in sorted(done & shards):
        problems += _verify_shard(cache, reader, shard, paths)
    return problems
