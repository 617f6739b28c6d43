"""`qks cache verify` of a query index: every problem, read back in full, a chunk at a time."""

from __future__ import annotations

from pathlib import Path

from qks_pipeline.index.store import ARRAYS, open_index
from qks_pipeline.store.checked import chunk_path, unreadable_chunks
from qks_pipeline.store.verify import Verdict

QUERY_INDEX = "query index"


def verify_index(path: str | Path) -> Verdict:
    """Every problem of a query index (`qks cache verify`): shards not built, chunks missing from
    any array, chunks that do not decode (each chunk's crc32c), read a chunk at a time."""
    index = open_index(path)
    done = index.done_shards()
    shards = set(range(index.num_shards))
    problems = [f"shard {s}: no done marker (not built)" for s in sorted(shards - done)]
    missing = index.missing_chunks(done & shards)
    problems += [f"{chunk_path(index.location, key)}: chunk missing" for key in missing]
    for name in ARRAYS:
        problems += unreadable_chunks(index.location, name, index.group[name])
    z = index.z
    summary = (
        f"{index.num_shards} shards, {index.num_images} images, z {tuple(z.shape)} {z.dtype}; "
        "every chunk's crc32c checked"
    )
    return Verdict(QUERY_INDEX, problems, summary)
