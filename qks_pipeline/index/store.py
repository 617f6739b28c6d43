"""The query index on disk: one Zarr v3 store holding, for every image of a feature store, the
head's query outputs `z = query_features(tokens) @ proj` (N, Q, E), which do not depend on the
labels, and what evaluation and tagging need beside them.

- `z`: (N, Q, E) float16 (`index.precision: fp16`) or float32, one raw chunk a shard; filled with
  NaN, so a shard never written reads as NaN. In fp16, each query output minus `z_mean`; in fp32,
  as it is (`z_mean` zero).
- `z_mean`: (Q, E) float32, the mean query outputs of the first shard's images (fp16). A head's
  query outputs share a large common part (on a trained synthetic head, 99% of their magnitude):
  rounding the remainder to float16 moves logits 100x less than rounding z itself.
- `valid`, `paths`, `labels`: the feature store's readable images, image paths and (N, C) int8
  label matrix.
- attributes: `index`, the fingerprint (the checkpoint's identity, the feature store's fingerprint,
  the precision); the label names (seen then unseen), `num_seen`, `shard_size`, the checkpoint's
  config.json and directory.
- `done/NNNNN.json`: one marker per finished shard, written after it.

Every chunk of every array ends with its crc32c and is written, also one equal to the fill value
(`store.checked`, from format version 2): a chunk that is not there is damage, found by
`require_complete` with one listing an array; a chunk that does not decode is one error naming its
file. A done shard whose z chunk is gone is computed again by a rerun of `qks index`.

A label's logit for image i is `max_q (z[i, q] + z_mean[q]) . e_label`, the last two lines of
`model.QKS.forward`, in float32 whatever `z` is stored as.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c  # zarr's own crc32c dependency, as the shard reader uses it
import numpy as np
import torch
import zarr

from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.checkpoint import BEST
from qks_pipeline.store.checked import (
    DAMAGE,
    EVERY_CHUNK,
    CheckedArray,
    chunk_path,
    create_checked,
    missing_chunks,
    missing_error,
)
from qks_pipeline.store.features import NO_SPACE, Cache
from qks_pipeline.store.location import Location
from qks_pipeline.store.sharded import ShardedStore, done_marker

# 2: every chunk of every array written, with its crc32c (1: z's only, the others could be absent)
FORMAT_VERSION = 2
# what a lost chunk of any array but z needs (a lost z chunk: a rerun computes its shard again)
OVERWRITE = "qks index --overwrite"
ARRAYS = ("z", "z_mean", "valid", "paths", "labels")
DTYPES = {"fp16": "float16", "fp32": "float32"}
# entries of the (B, Q, C) per-query scores computed at once: 64 MiB of float32
BLOCK_ENTRIES = 1 << 24
# entries of z converted to float32 at once (torch's grain size is 32,768)
COPY_ENTRIES = 32_768
# bytes of the label matrix copied at once into a new index
COPY_BYTES = 64 * 2**20
# the config.json keys that decide what the head computes
HEAD_KEYS = ("model", "token_dim", "num_tokens", "embed_dim", "fingerprint")


def checkpoint_identity(directory: str | Path, config: dict[str, Any]) -> dict[str, str]:
    """A checkpoint's identity: the sha256 of its best weights file and of the config that shapes
    the head."""
    digest = hashlib.sha256()
    with open(Path(directory) / BEST, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    head = json.dumps({k: config.get(k) for k in HEAD_KEYS}, sort_keys=True)
    return {
        "weights_sha256": digest.hexdigest(),
        "config_sha256": hashlib.sha256(head.encode()).hexdigest(),
    }


def index_fingerprint(
    identity: dict[str, str], store: dict[str, Any], precision: str
) -> dict[str, Any]:
    """What an index's content depends on, normalised through JSON to compare with the stored
    copy."""
    blob = {
        "format_version": FORMAT_VERSION,
        "checkpoint": identity,
        "store": store,
        "precision": precision,
    }
    return json.loads(json.dumps(blob))


def label_table(label_emb: torch.Tensor, z_mean: torch.Tensor) -> torch.Tensor:
    """(E + Q, C): the label embeddings (C, E) transposed, then each query's mean output's score
    `z_mean (Q, E) @ e_c`. Rows [z - z_mean, one-hot of q] times it give z . e_c: the centring is
    undone inside the one product, with no pass over the (B, Q, C) scores."""
    return torch.cat([label_emb.T, z_mean @ label_emb.T])  # (E, C) over (Q, E) @ (E, C)


def score_block(
    block: torch.Tensor, table: torch.Tensor, query_index: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, C) float32 of `block` (B, Q, E + Q) float32, each row [centred z, one-hot of its
    query], against `label_table`'s (E + Q, C), and with `query_index` which query gave each logit
    (B, C), as `model.QKS.forward` computes them."""
    scores = block @ table  # (B, Q, E + Q) @ (E + Q, C) -> (B, Q, C)
    if not query_index:
        return scores.amax(dim=1), None
    logits, index = scores.max(dim=1)  # (B, C) each
    return logits, index


@dataclass
class IndexStore(ShardedStore):
    """An open index; arrays are zarr arrays, read lazily. Build one with `create_index`, open one
    with `open_index`."""

    def checked(self, name: str) -> CheckedArray:
        """The array `name`, its damaged chunks one error naming the file (`store.checked`)."""
        return CheckedArray(self.group[name].with_config(EVERY_CHUNK), self.location, name)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.group.attrs["index"]

    @property
    def precision(self) -> str:
        return self.fingerprint["precision"]

    @property
    def store_fingerprint(self) -> dict[str, Any]:
        """The fingerprint of the feature store the index was built from."""
        return self.fingerprint["store"]

    @property
    def checkpoint_config(self) -> dict[str, Any]:
        """The config.json of the checkpoint whose head made `z`."""
        return self.group.attrs["checkpoint_config"]

    @property
    def checkpoint_dir(self) -> Path:
        """Where that checkpoint was when the index was built."""
        return Path(self.group.attrs["checkpoint_dir"])

    @property
    def label_names(self) -> list[str]:
        """The feature store's labels, seen then unseen."""
        return list(self.group.attrs["labels"])

    @property
    def num_seen(self) -> int:
        return int(self.group.attrs["num_seen"])

    # the arrays are opened once: each opening reads and parses their metadata
    @functools.cached_property
    def z(self) -> CheckedArray:
        """(N, Q, E) the query outputs, centred on `z_mean`; read a shard at a time by
        `read_shard`."""
        return self.checked("z")

    @functools.cached_property
    def z_mean(self) -> np.ndarray:
        """(Q, E) float32: what the stored z are centred on."""
        return self.checked("z_mean")[:]

    @functools.cached_property
    def valid(self) -> CheckedArray:
        """(N,) bool: False for an image stage one could not read."""
        return self.checked("valid")

    @functools.cached_property
    def paths(self) -> CheckedArray:
        """(N,) each row's image, relative to the image root; some rows: `take_rows`."""
        return self.checked("paths")

    @functools.cached_property
    def labels(self) -> CheckedArray:
        """(N, C) int8: +1 positive, -1 negative, 0 unknown; some rows: `take_rows`."""
        return self.checked("labels")

    @property
    def num_images(self) -> int:
        return self.z.shape[0]

    @property
    def num_queries(self) -> int:
        return self.z.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.z.shape[2]

    def require_complete(self) -> None:
        """Refuse an index with a shard not built or a chunk missing (`missing_chunks`).

        Checked once per `IndexStore`: a listing of the done markers and one of each array.
        """
        if self._complete:
            return
        if missing := self.num_shards - len(self.done_shards()):
            raise QKSError(
                f"index is incomplete: {missing} of {self.num_shards} shards not built; rerun "
                "`qks index`",
                self.path,
            )
        if chunks := self.missing_chunks():
            raise missing_index_error(self.location, chunks)
        self._complete = True

    def missing_chunks(self, shards: set[int] | None = None) -> list[str]:
        """Keys of the chunks the index must hold and does not: every chunk of every array, those
        of z for the done shards only (or `shards`); one listing an array."""
        done = self.done_shards() if shards is None else shards
        # z's chunks (grid coordinates (shard, 0, 0)) of the done shards only
        missing = missing_chunks(self.location, "z", self.group["z"], lambda c: c[0] in done)
        for name in ARRAYS[1:]:
            missing += missing_chunks(self.location, name, self.group[name])
        return missing

    def lost_shards(self) -> set[int]:
        """Done shards whose z chunk is missing: their done markers, now wrong, are removed, so
        that a rerun computes them again. A missing chunk of another array is refused: only a
        rebuild writes it."""
        missing = self.missing_chunks()
        if other := [key for key in missing if not key.startswith("z/")]:
            raise missing_error(self.location, other, OVERWRITE)
        # "z/c/<shard>/0/0"
        lost = {int(key.split("/")[2]) for key in missing}
        for shard in sorted(lost):
            self.location.delete(done_marker(shard))
        return lost

    def write_shard(self, shard: int, z: np.ndarray) -> None:
        """Write one whole shard of z (S, Q, E) float32, centred here, then its done marker (the
        only proof of completion)."""
        rows = self.shard_rows(shard)
        assert z.shape == (rows.stop - rows.start, *self.z.shape[1:]), (z.shape, rows)
        record = {"shard": shard, "rows": [rows.start, rows.stop]}
        try:
            self.z[rows] = (z - self.z_mean).astype(self.z.dtype)
            self.location.write_text(done_marker(shard), json.dumps(record))
        except OSError as e:  # the shard stays not done: a rerun redoes it
            if e.errno not in NO_SPACE:
                raise
            message = f"cannot write index shard {shard}: {e.strerror}"
            raise QKSError(message, e.filename or self.path) from None

    @functools.cached_property
    def _chunk_files(self) -> Path | None:
        """The directory of z's chunk files when this process reads them itself (a local store,
        each chunk raw little-endian bytes then their crc32c: zarr-python spends ~10 ms a call),
        else None (zarr reads them)."""
        if not self.location.local:
            return None
        meta = json.loads((self.location.url / "z" / "zarr.json").read_text())
        keys = meta["chunk_key_encoding"]
        codecs = [(c["name"], c.get("configuration", {})) for c in meta["codecs"]]
        separator = keys.get("configuration", {}).get("separator", "/")
        direct = (keys["name"], separator) == ("default", "/")
        if not direct or codecs != [("bytes", {"endian": "little"}), ("crc32c", {})]:
            return None
        return self.location.url / "z" / "c"

    def _read_chunk(self, shard: int, directory: Path) -> np.ndarray:
        """One shard's chunk read straight from its file, its crc32c checked."""
        path = directory / str(shard) / "0" / "0"
        shape = (self.shard_size, *self.z.shape[1:])
        size = int(np.prod(shape)) * self.z.dtype.itemsize
        try:
            with open(path, "rb", buffering=0) as f:
                raw = bytearray(size + 5)  # one byte more: a longer file is found too
                got = f.readinto(raw)
        except FileNotFoundError:
            raise lost_shard_error(shard, path) from None
        data = np.frombuffer(raw, np.uint8, count=size)  # a buffer google_crc32c takes
        stored = int.from_bytes(raw[size : size + 4], "little")
        if got != size + 4 or google_crc32c.value(data) != stored:
            what = "the wrong size" if got != size + 4 else "a crc32c checksum mismatch"
            raise damaged_shard_error(shard, path, what)
        z = np.frombuffer(raw, self.z.dtype, count=int(np.prod(shape))).reshape(shape)
        return z[: self.shard_rows(shard).stop - self.shard_rows(shard).start]

    def read_shard(self, shard: int) -> np.ndarray:
        """z of one shard (S, Q, E) as stored; a damaged or missing shard is one clear error."""
        if self._chunk_files is not None:
            return self._read_chunk(shard, self._chunk_files)
        where = chunk_path(self.location, f"z/c/{shard}/0/0")
        try:
            z = self.z.array[self.shard_rows(shard)]
        except DAMAGE as e:  # zarr's crc32c check: a truncated or overwritten file
            raise damaged_shard_error(shard, where, str(e).split(". Stored")[0]) from None
        # the NaN fill: the chunk went after `require_complete` looked
        if z.size and np.isnan(z.flat[0]):
            raise lost_shard_error(shard, where)
        return z

    def blocks(
        self, rows: np.ndarray | None = None, valid_only: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows (B,), z (B, Q, E)) over `rows` (ascending; default: the valid rows, or every row
        without `valid_only`), one shard at a time: memory flat in N."""
        valid = np.asarray(self.valid[:], dtype=bool) if rows is None and valid_only else None
        for shard in range(self.num_shards):
            span = self.shard_rows(shard)
            if rows is None:
                every = np.arange(span.start, span.stop)
                picked = every if valid is None else every[valid[span]]
            else:
                picked = rows[np.searchsorted(rows, span.start) : np.searchsorted(rows, span.stop)]
            if len(picked) == span.stop - span.start:  # the whole shard: no copy
                yield picked, self.read_shard(shard)
            elif len(picked):
                yield picked, self.read_shard(shard)[picked - span.start]

    def logit_blocks(
        self,
        label_emb: torch.Tensor,
        rows: np.ndarray | None = None,
        query_index: bool = False,
        valid_only: bool = True,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
        """(rows (b,), logits (b, C) float32, query index (b, C) or None) over `rows` as `blocks`
        takes them, in blocks of at most `BLOCK_ENTRIES` per-query scores."""
        q, e = self.num_queries, self.embed_dim
        step = max(1, BLOCK_ENTRIES // (q * max(1, label_emb.shape[0])))
        table = label_table(label_emb.float(), torch.from_numpy(self.z_mean).to(label_emb.device))
        # (b, Q, E + Q): each block's z, converted to float32 on the way in, beside a one-hot
        buffer = torch.zeros(min(step, self.shard_size), q, e + q, device=label_emb.device)
        buffer[:, :, e:] = torch.eye(q)
        for picked, z in self.blocks(rows, valid_only):
            source = torch.from_numpy(z)  # (S', Q, E) as stored
            for start in range(0, len(picked), step):
                block = buffer[: min(step, len(picked) - start)]
                _convert(block[:, :, :e], source[start : start + len(block)])
                logits, index = score_block(block, table, query_index)
                yield picked[start : start + len(block)], logits, index


def take_rows(array: CheckedArray, rows: np.ndarray) -> np.ndarray:
    """`array`'s `rows` (any order, at least one), a damaged chunk one error naming it."""
    try:
        return array.array.oindex[rows]
    except DAMAGE as e:
        raise array.damage(slice(int(rows.min()), int(rows.max()) + 1), e) from None


def lost_shard_error(shard: int, where: Path | str, more: str = "") -> QKSError:
    """A done shard whose z chunk is gone: a rerun of `qks index` computes it again."""
    message = f"index shard {shard} lost its z chunk{more}; rerun `qks index` to compute it again"
    return QKSError(message, where)


def damaged_shard_error(shard: int, where: Path | str, what: str) -> QKSError:
    """A z chunk that does not decode (`what`)."""
    again = "delete this file and rerun `qks index` to compute it again"
    return QKSError(f"index shard {shard} is damaged ({what}); {again}", where)


def missing_index_error(location: Location, keys: list[str]) -> QKSError:
    """One line naming a missing chunk: of an array but z, only a rebuild writes it; of z, a
    rerun computes its shard again."""
    if other := [key for key in keys if not key.startswith("z/")]:
        return missing_error(location, other, OVERWRITE)
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    # "z/c/<shard>/0/0"
    shard = int(keys[0].split("/")[2])
    return lost_shard_error(shard, chunk_path(location, keys[0]), more)


def _convert(out: torch.Tensor, z: torch.Tensor) -> None:
    """Copy z (B, Q, E) into `out` as float32, `COPY_ENTRIES` at a time: below torch's grain size
    each copy runs in one thread. Parallel copies made the scan 8x slower on 2 busy cores (each
    waits for the other core); a copy is memory-bound anyway."""
    rows = max(1, COPY_ENTRIES // (z.shape[1] * z.shape[2]))
    for start in range(0, z.shape[0], rows):
        out[start : start + rows].copy_(z[start : start + rows])


def _copy_rows(group: zarr.Group, cache: Cache, shard: int) -> None:
    """The feature store's validity, then its paths and label matrix whole shards at a time, about
    `COPY_BYTES` of labels (the whole matrix may not fit in memory)."""
    n, c = cache.labels.shape
    # one chunk, read at once by every scan (N bytes)
    valid = create_checked(group, "valid", shape=(n,), dtype="bool", chunks=(max(n, 1),))
    valid[:] = cache.valid[:]
    paths = create_checked(group, "paths", shape=(n,), dtype=str, chunks=(shard,))
    labels = create_checked(group, "labels", shape=(n, c), dtype="int8", chunks=(shard, max(1, c)))
    step = shard * max(1, COPY_BYTES // (shard * max(1, c)))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        paths[rows] = np.asarray(cache.paths[rows], dtype=object)
        labels[rows] = cache.labels[rows]


def create_index(
    path: str | Path,
    cache: Cache,
    *,
    fingerprint: dict[str, Any],
    z_mean: np.ndarray,
    checkpoint_dir: Path,
    checkpoint_config: dict[str, Any],
) -> IndexStore:
    """Create an empty index for the feature store `cache` (all but z), whole or not at all: built
    under a temporary name and put in place (`Location.building`)."""
    n = cache.num_images
    shard = cache.shard_size
    num_queries, embed_dim = z_mean.shape
    with Location.of(path).building() as tmp:
        group = tmp.open_group("w")
        # raw bytes then their crc32c: `IndexStore._read_chunk` reads them itself
        create_checked(
            group,
            "z",
            compress=False,
            shape=(n, num_queries, embed_dim),
            dtype=DTYPES[fingerprint["precision"]],
            chunks=(shard, num_queries, embed_dim),
            fill_value=float("nan"),
        )
        create_checked(group, "z_mean", shape=z_mean.shape, dtype="float32")[:] = z_mean
        _copy_rows(group, cache, shard)
        group.attrs.update(
            index=fingerprint,
            labels=cache.label_names,
            num_seen=cache.num_seen,
            shard_size=shard,
            checkpoint_dir=str(checkpoint_dir.resolve()),
            checkpoint_config=checkpoint_config,
        )
        tmp.makedirs("done")
    return open_index(path, mode="r+")


def is_index(location: Location) -> bool:
    """Whether the Zarr store at `location` is a query index (not a feature or label store)."""
    try:
        return isinstance(location.open_group("r").attrs.get("index"), dict)
    except (QKSError, FileNotFoundError, ValueError):
        return False


def check_version(fingerprint: dict[str, Any], url: Path | str) -> None:
    """Refuse an index of another format version in one line."""
    if (version := fingerprint.get("format_version")) != FORMAT_VERSION:
        rebuild = "rebuild it: qks index --replace-stale"
        message = f"index format version {version}, this qks reads {FORMAT_VERSION}; {rebuild}"
        raise QKSError(message, url)


def open_index(path: str | Path, mode: str = "r") -> IndexStore:
    """Open an index written by `create_index`; a missing, foreign or damaged one is one clear
    error."""
    location = Location.of(path)
    if not location.exists("zarr.json"):
        raise QKSError("no query index here (run `qks index` first)", location.url)
    group = location.open_group(mode)
    fingerprint = group.attrs.get("index")
    if not isinstance(fingerprint, dict):
        raise QKSError("not a qks query index (a feature or label store?)", location.url)
    check_version(fingerprint, location.url)
    if missing := [name for name in ARRAYS if name not in group]:
        message = f"damaged query index: no {', '.join(missing)} array; rebuild it (--overwrite)"
        raise QKSError(message, location.url)
    return IndexStore(location.url, group)
