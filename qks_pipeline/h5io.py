"""HDF5 interop: export a finished feature store to one .h5 file and import such a file back into a store.

Layout of the .h5 file (attributes hold only small values; HDF5 attributes are limited to 64 KiB):

    features        float16 (N, V, T, D)  the store's tokens, chunk (1, 1, T, D), uncompressed
    labels          int8    (N, C)
    valid           bool    (N,)
    paths           utf-8   (N,)
    manifest_index  int64   (N,)
    visual_proj     float32 (D, E)
    label_names     utf-8   (C,)          seen labels then unseen labels
    done            utf-8   scalar        JSON list of the store's done markers (per shard: rows, skipped images)
    attrs: format, fingerprint (JSON), num_seen, shard_size
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from qks_pipeline.atomic import atomic_path
from qks_pipeline.cache import Cache, create_cache, open_cache
from qks_pipeline.errors import QKSError
from qks_pipeline.storage import Location

FORMAT = "qks-feature-cache-hdf5/1"
STR = h5py.string_dtype("utf-8")


def _write_small(f: h5py.File, cache: Cache) -> None:
    f.create_dataset("valid", data=cache.valid[:])
    f.create_dataset("paths", data=np.asarray(cache.paths[:], dtype=object), dtype=STR)
    f.create_dataset("manifest_index", data=cache.manifest_index[:])
    f.create_dataset("visual_proj", data=cache.visual_proj[:])
    f.create_dataset("label_names", data=np.asarray(cache.label_names, dtype=object), dtype=STR)
    done = [cache.done_record(s) for s in range(cache.num_shards)]
    f.create_dataset("done", data=json.dumps(done), dtype=STR)
    f.attrs.update(
        {
            "format": FORMAT,
            "fingerprint": json.dumps(cache.fingerprint),
            "num_seen": cache.num_seen,
            "shard_size": cache.shard_size,
        }
    )


def export_hdf5(store: str | Path, out: str | Path) -> Path:
    """Write a complete store to `out` (through a temporary file, renamed when finished)."""
    cache, out = open_cache(store), Path(out)
    cache.require_complete()
    n, v, t, d = cache.tokens.shape
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", shape=(n, v, t, d), dtype="float16", chunks=(1, 1, t, d) if n else None)
        labels = f.create_dataset("labels", shape=cache.labels.shape, dtype="int8")
        for shard in range(cache.num_shards):
            rows = cache.shard_rows(shard)
            feats[rows] = cache.tokens[rows]  # one whole shard at a time: bounded memory
            labels[rows] = cache.labels[rows]
        _write_small(f, cache)
    return out


def _read_export(f: h5py.File, path: Path) -> dict:
    if f.attrs.get("format") != FORMAT:
        raise QKSError(f"not a qks feature-cache export (format attribute {f.attrs.get('format')!r})", path)
    missing = [k for k in ("features", "labels", "valid", "paths", "manifest_index", "visual_proj", "label_names")
               if k not in f]  # fmt: skip
    if missing:
        raise QKSError(f"HDF5 export lacks dataset(s) {', '.join(missing)}", path)
    names = [s.decode() if isinstance(s, bytes) else s for s in f["label_names"][:]]
    if f["labels"].shape != (f["features"].shape[0], len(names)):
        raise QKSError(f"HDF5 export's labels have shape {f['labels'].shape}, expected (images, {len(names)})", path)
    return {
        "fingerprint": json.loads(f.attrs["fingerprint"]),
        "labels": lambda start, stop: f["labels"][start:stop],  # read a shard at a time
        "label_names": names,
        "paths": [s.decode() if isinstance(s, bytes) else s for s in f["paths"][:]],
        "manifest_index": f["manifest_index"][:],
        "visual_proj": f["visual_proj"][:],
        "done": json.loads(f["done"][()]),
    }


def import_hdf5(h5: str | Path, store: str | Path, overwrite: bool = False) -> Cache:
    """Rebuild a store (arrays, attributes, done markers) from an export; an existing store needs `overwrite`."""
    h5, location = Path(h5), Location.of(store)
    if not h5.is_file():
        raise QKSError("HDF5 file not found", h5)
    with location.writer_lock():
        if location.holds_store() and not overwrite:
            raise QKSError("store exists (use --overwrite to replace it)", location.url)
        with h5py.File(h5, "r") as f:
            return _rebuild(f, h5, store)


def _rebuild(f: h5py.File, h5: Path, store: str | Path) -> Cache:
    meta = _read_export(f, h5)
    n, v, t, d = f["features"].shape
    cache = create_cache(
        store, fingerprint=meta["fingerprint"], token_shape=(t, d), num_views=v,
        shard_size=int(f.attrs["shard_size"]), label_names=meta["label_names"], num_seen=int(f.attrs["num_seen"]),
        labels=meta["labels"], paths=meta["paths"], manifest_index=meta["manifest_index"],
        visual_proj=meta["visual_proj"],
    )  # fmt: skip
    valid = f["valid"][:]
    for record in meta["done"]:
        shard = record["shard"]
        rows = cache.shard_rows(shard)
        if record["rows"] != [rows.start, rows.stop]:
            raise QKSError(f"done record of shard {shard} covers rows {record['rows']}, not {rows}", h5)
        cache.write_shard(shard, f["features"][rows], valid[rows], record["skipped"])
    return cache
