"""HDF5 interop: a finished feature store to one .h5 file and back.

The file's layout: docs/design.md, section 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from qks_pipeline.atomic import atomic_path
from qks_pipeline.data.manifest import require_file
from qks_pipeline.errors import QKSError
from qks_pipeline.store.features import Cache, create_cache, open_cache
from qks_pipeline.store.location import Location

FORMAT = "qks-feature-cache-hdf5/1"
STR = h5py.string_dtype("utf-8")
# create_cache arguments stored as they are: arrays, string lists, integer attributes
ARRAYS = ("manifest_index", "visual_proj")
STRINGS = ("paths", "label_names")
ATTRS = ("num_seen", "shard_size")


def export_hdf5_cache(store: str | Path, out: str | Path) -> Path:
    """Write a complete store to `out` (through a temporary file, renamed when finished)."""
    cache = open_cache(store)
    out = Path(out)
    cache.require_complete()
    n, v, t, d = cache.tokens.shape
    # h5py refuses chunks larger than an empty dataset
    chunks = (1, 1, t, d) if n else None
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", shape=(n, v, t, d), dtype="float16", chunks=chunks)
        labels = f.create_dataset("labels", shape=cache.labels.shape, dtype="int8")
        # one whole shard at a time: bounded memory
        for shard in range(cache.num_shards):
            rows = cache.shard_rows(shard)
            # a damaged shard: one error naming its file
            feats[rows] = cache.checked("tokens")[rows]
            labels[rows] = cache.labels[rows]
        for name in ("valid", *ARRAYS):
            f.create_dataset(name, data=getattr(cache, name)[:])
        for name, strings in zip(STRINGS, (cache.paths[:], cache.label_names), strict=True):
            f.create_dataset(name, data=np.asarray(strings, dtype=object), dtype=STR)
        done = [cache.done_record(s) for s in range(cache.num_shards)]
        f.create_dataset("done", data=json.dumps(done), dtype=STR)
        f.attrs.update({name: getattr(cache, name) for name in ATTRS})
        f.attrs.update(format=FORMAT, fingerprint=json.dumps(cache.fingerprint))
    return out


def import_hdf5_cache(h5: str | Path, store: str | Path, overwrite: bool = False) -> Cache:
    """Rebuild a store (arrays, attributes, done markers) from an export (`overwrite`: replace)."""
    location = Location.of(store)
    h5 = require_file(h5, "HDF5 file")
    with location.writer_lock(), h5py.File(h5, "r") as f:
        if location.holds_store() and not overwrite:
            raise QKSError("store exists (use --overwrite to replace it)", location.url)
        if f.attrs.get("format") != FORMAT:
            raise QKSError(
                f"not a qks feature-cache export (format attribute {f.attrs.get('format')!r})", h5
            )
        needed = ("features", "labels", "valid", "done", *ARRAYS, *STRINGS)
        missing = [name for name in needed if name not in f]
        if missing:
            raise QKSError(f"HDF5 export lacks dataset(s) {', '.join(missing)}", h5)
        meta = {name: f[name][:] for name in ARRAYS}
        meta |= {name: f[name].asstr()[:].tolist() for name in STRINGS}
        meta |= {name: int(f.attrs[name]) for name in ATTRS}
        n, v, t, d = f["features"].shape
        # not loaded whole: create_cache reads it a shard at a time
        labels = f["labels"]
        if labels.shape != (n, len(meta["label_names"])):
            raise QKSError(
                f"HDF5 export's labels have shape {labels.shape}, not (images, label names)", h5
            )
        meta["fingerprint"] = json.loads(f.attrs["fingerprint"])
        cache = create_cache(
            store, token_shape=(t, d), num_views=v, labels=lambda a, b: labels[a:b], **meta
        )
        valid = f["valid"][:]
        for record in json.loads(f["done"][()]):
            shard = record["shard"]
            rows = cache.shard_rows(shard)
            if record["rows"] != [rows.start, rows.stop]:
                raise QKSError(
                    f"done record of shard {shard} covers rows {record['rows']}, not {rows}", h5
                )
            cache.write_shard(shard, f["features"][rows], valid[rows], record["skipped"])
    return cache
