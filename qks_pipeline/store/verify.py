"""`qks cache verify`: every problem of a feature store or a label store, read back in full."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qks_pipeline.errors import QKSError
from qks_pipeline.store.checked import (
    chunk_path,
    has_checksums,
    missing_chunks,
    unreadable_chunks,
)
from qks_pipeline.store.features import ARRAYS, Cache, open_cache
from qks_pipeline.store.label_store import CLIP_EMBEDDINGS, open_label_store
from qks_pipeline.store.location import Location
from qks_pipeline.store.shard_reader import Reader, open_reader

# rows read at a time by `verify_cache`
VERIFY_ROWS = 64
FEATURE_STORE = "feature store"
LABEL_STORE = "label store"


@dataclass
class Verdict:
    """What `verify_store` found: the kind of store, its problems, a summary of what it checked."""

    kind: str  # FEATURE_STORE or LABEL_STORE
    problems: list[str]
    summary: str


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


def _array_problems(cache: Cache, done: set[int]) -> tuple[list[str], set[int]]:
    """Missing and undecodable chunks of every array (the tokens' chunks: by `_verify_shard`),
    and the done shards whose token shard file is missing."""
    location = cache.location
    missing = cache.missing_chunks(done)
    problems = [f"{chunk_path(location, key)}: chunk missing" for key in missing]
    for name in ARRAYS[1:]:
        problems += unreadable_chunks(location, name, cache.group[name])
    # "tokens/c/<shard>/0/0/0"
    no_file = {int(key.split("/")[2]) for key in missing if key.startswith("tokens/")}
    return problems, no_file


def verify_cache(cache: Cache) -> list[str]:
    """Every problem of a feature store, read back in full.

    Missing or inconsistent done markers; a chunk missing from any array; any chunk that does not
    decode (every chunk's crc32c, from format version 3 on; the tokens' from version 2 on);
    valid/skipped mismatches; valid rows of zeros.
    """
    done = cache.done_shards()
    shards = set(range(cache.num_shards))
    problems = [f"shard {s}: no done marker (not extracted)" for s in sorted(shards - done)]
    problems += [
        f"done marker {s:05d}.json names no shard of this store" for s in sorted(done - shards)
    ]
    damaged, no_file = _array_problems(cache, done & shards)
    if damaged:
        # the shard checks read valid and paths: damaged, they would only add noise
        return problems + damaged
    paths = cache.paths[:]
    reader = open_reader(cache.location, cache.tokens, every_chunk=cache.every_chunk_written)
    for shard in sorted((done & shards) - no_file):
        problems += _verify_shard(cache, reader, shard, paths)
    return problems


def verify_label_store(path: str | Path) -> Verdict:
    """Every problem of a label store: each array's chunk there and decoding, one row a label,
    finite values."""
    location, group, attrs = open_label_store(path)
    names = [n for n in ("embeddings", CLIP_EMBEDDINGS) if n in group]
    problems = []
    for name in names:
        array = group[name]
        missing = missing_chunks(location, name, array)
        problems += [f"{chunk_path(location, key)}: chunk missing" for key in missing]
        broken = unreadable_chunks(location, name, array)
        problems += broken
        if missing or broken:
            continue
        if array.shape[0] != len(attrs["labels"]):
            problems.append(f"{name}: {array.shape[0]} rows for {len(attrs['labels'])} labels")
        if not np.isfinite(array[:]).all():
            problems.append(f"{name}: non-finite values")
    shapes = ", ".join(f"{n} {tuple(group[n].shape)}" for n in names)
    summary = f"{len(attrs['labels'])} labels, {shapes}; {_checksums(group[n] for n in names)}"
    return Verdict(LABEL_STORE, problems, summary)


def _checksums(arrays) -> str:
    """What the checksums covered, in words."""
    if all(has_checksums(a) for a in arrays):
        return "every chunk's crc32c checked"
    return "some arrays carry no checksum (a store before format version 3: rebuild it to check)"


def verify_store(path: str | Path) -> Verdict:
    """Verify the feature store or label store at `path` (told apart by their arrays)."""
    location = Location.of(path)
    if not location.exists("zarr.json"):
        raise QKSError("no store here (run `qks extract` or `qks embed-labels` first)", path)
    group = location.open_group("r")
    if "tokens" not in group and "embeddings" in group:
        return verify_label_store(path)
    cache = open_cache(path)
    problems = verify_cache(cache)
    if problems:
        return Verdict(FEATURE_STORE, problems, "")
    arrays = (cache.group[name] for name in ARRAYS)
    counts = f"{cache.num_shards} shards, {cache.num_images} images"
    summary = f"{counts}, {len(cache.skipped())} skipped; {_checksums(arrays)}"
    return Verdict(FEATURE_STORE, problems, summary)
