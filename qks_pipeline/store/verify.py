"""`qks cache verify`: every problem of a feature store, read back in full."""

from __future__ import annotations

import numpy as np

from qks_pipeline.errors import QKSError
from qks_pipeline.store.features import Cache
from qks_pipeline.store.shard_reader import Reader, open_reader

VERIFY_ROWS = 64  # rows read at a time by `verify_cache`


def _verify_shard(cache: Cache, reader: Reader, shard: int, paths: np.ndarray) -> list[str]:
    rows = cache.shard_rows(shard)
    record = cache.done_record(shard)
    if record.get("rows") != [rows.start, rows.stop]:
        return [f"shard {shard}: marker rows {record.get('rows')} != {[rows.start, rows.stop]}"]
    valid, problems = cache.valid[rows], []
    skipped = {s["path"] for s in record["skipped"]}
    invalid = set(paths[rows][~valid].tolist())
    if invalid != skipped:
        problems.append(
            f"shard {shard}: {len(invalid)} rows not valid but {len(skipped)} images recorded as skipped"
        )
    v, sample = cache.num_views, cache.tokens.shape[2:]
    for start in range(rows.start, rows.stop, VERIFY_ROWS):  # a piece at a time: a shard can be GBs
        n = min(VERIFY_ROWS, rows.stop - start)
        tokens = np.empty((n * v, *sample), np.float16)  # (n x V, T, D)
        try:
            reader.read(np.repeat(np.arange(start, start + n), v), np.tile(np.arange(v), n), tokens)
        except QKSError as e:
            return [*problems, f"shard {shard}: {e}"]
        # a damaged shard surfaces as any of zarr's, TensorStore's or numcodecs' errors
        except Exception as e:
            return [*problems, f"shard {shard}: unreadable ({type(e).__name__}: {e})"]
        # (n, V x T x D)
        tokens, ok = tokens.reshape(n, -1), valid[start - rows.start : start - rows.start + n]
        for i in start + np.flatnonzero(ok & ~tokens.any(axis=1)):
            problems.append(f"shard {shard}: row {i} ({paths[i]}) is valid but all zero")
        if not np.isfinite(tokens[ok]).all():
            problems.append(f"shard {shard}: non-finite tokens in rows {start}-{start + n - 1}")
    return problems


def verify_cache(cache: Cache) -> list[str]:
    """Every problem found: missing or inconsistent done markers, damaged shards (every chunk's
    checksum from format version 2 on), valid/skipped mismatches, valid rows of zeros."""
    done, shards = cache.done_shards(), set(range(cache.num_shards))
    problems = [f"shard {s}: no done marker (not extracted)" for s in sorted(shards - done)]
    problems += [
        f"done marker {s:05d}.json names no shard of this store" for s in sorted(done - shards)
    ]
    paths, reader = cache.paths[:], open_reader(cache.location, cache.tokens)
    for shard in sorted(done & shards):
        problems += _verify_shard(cache, reader, shard, paths)
    return problems
