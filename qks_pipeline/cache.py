"""The feature cache: one Zarr v3 store per split, written by stage one and read by stage two.

Arrays, attributes and done markers: docs/design.md, section 2; the shard byte layout is read in `qks_pipeline.shards`.
A store is a local directory or an fsspec URL (`qks_pipeline.storage`), so `Cache.path` is a Path or a URL string.
"""

from __future__ import annotations

import errno
import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from qks_pipeline.errors import QKSError
from qks_pipeline.shards import Reader, open_reader
from qks_pipeline.storage import Location

FORMAT_VERSION = 2  # 2: a crc32c per inner token chunk; 1 (still read): none
READ_VERSIONS = (1, 2)
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk, a quota, a file-size limit: a user error
VERIFY_ROWS = 64  # rows read at a time by `verify_cache`
ARRAYS = ("tokens", "labels", "valid", "paths", "manifest_index", "visual_proj")  # the order of `Cache`'s accessors


def make_fingerprint(backbone: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A store's identity (docs/design.md, section 2), normalised through JSON to compare equal to the stored copy."""
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, "backbone": backbone, "data": data or {}}))


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in `a`, value in `b`) for every leaf where two nested dicts differ."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            diffs.append((prefix + key, x, y))
    return diffs


def check_fingerprint(
    path: str | Path, found: dict[str, Any], expected: dict[str, Any], what: str = "cache", hint: str = ""
) -> None:
    """Refuse a store built differently from what is asked for, naming every difference (and `hint`, if given)."""
    diffs = [f"{key} is {a!r} in the store, {b!r} expected" for key, a, b in differing_keys(found, expected)]
    if diffs:
        raise QKSError(f"{what} was built differently: " + "; ".join(diffs) + (f" ({hint})" if hint else ""), path)


def describe_backbone(fp: dict[str, Any]) -> str:
    """A short human name of a backbone fingerprint: model, config hash, weights source and hash."""
    model = fp.get("model")
    if fp.get("model_config_sha256"):
        model = f"{model} (config sha256 {fp['model_config_sha256'][:12]})"
    return f"{model}, weights {fp.get('pretrained') or 'random'} sha256 {str(fp.get('weights_sha256'))[:12]}"


def _array(name: str) -> property:
    """A `Cache` accessor of the zarr array `name` (each look-up reads the array's metadata)."""
    return property(lambda cache: cache.group[name], doc=f"The `{name}` zarr array.")


def _attr(name: str, convert: Callable[[Any], Any] = lambda value: value) -> property:
    """A `Cache` accessor of the group attribute `name`, as `convert` makes it."""
    return property(lambda cache: convert(cache.group.attrs[name]), doc=f"The `{name}` attribute.")


@dataclass
class Cache:
    """An open feature store: arrays are zarr arrays, read lazily (`cache.valid[:]` gives numpy)."""

    path: Path | str  # a local directory, or an fsspec URL
    group: zarr.Group

    @functools.cached_property
    def location(self) -> Location:
        return Location.of(self.path)

    fingerprint, label_names = _attr("fingerprint"), _attr("labels", list)
    num_seen, shard_size = _attr("num_seen", int), _attr("shard_size", int)
    tokens, labels, valid, paths, manifest_index, visual_proj = (_array(name) for name in ARRAYS)

    @property
    def num_images(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_views(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_rows(self, shard: int) -> slice:
        return slice(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))

    def num_rows(self, shards: Iterable[int]) -> int:
        return sum(self.shard_rows(s).stop - self.shard_rows(s).start for s in shards)

    def done_record(self, shard: int) -> dict[str, Any]:
        """A finished shard's marker: {"shard", "rows": [start, stop], "skipped": [{"path", "reason"}]}."""
        return json.loads(self.location.read_text(_marker(shard)))

    def done_shards(self) -> set[int]:
        return {int(name[: -len(".json")]) for name in self.location.list("done") if name.endswith(".json")}

    def write_shard(self, shard: int, tokens: np.ndarray, valid: np.ndarray, skipped: list[dict[str, str]]) -> None:
        """Write one whole shard, then its done marker (the marker is the only proof of completion)."""
        rows = self.shard_rows(shard)
        n = rows.stop - rows.start
        assert tokens.shape[0] == n and valid.shape == (n,), (tokens.shape, valid.shape, n)
        record = {"shard": shard, "rows": [rows.start, rows.stop], "skipped": skipped}
        try:
            self.tokens[rows] = tokens.astype(np.float16, copy=False)
            self.valid[rows] = valid
            self.location.write_text(_marker(shard), json.dumps(record))
        except OSError as e:  # the shard stays not done: a rerun redoes it
            if e.errno not in NO_SPACE:
                raise  # maybe transient (a network store): a cluster run retries it
            raise QKSError(f"cannot write shard {shard}: {e.strerror}", e.filename or self.path) from None

    def skipped(self) -> list[dict[str, str]]:
        """Every image recorded as unreadable, over all finished shards."""
        return [image for shard in sorted(self.done_shards()) for image in self.done_record(shard)["skipped"]]

    def require_complete(self) -> None:
        if missing := self.num_shards - len(self.done_shards()):
            raise QKSError(
                f"cache is incomplete: {missing} of {self.num_shards} shards not extracted; rerun extract", self.path
            )


def _marker(shard: int) -> str:
    return f"done/{shard:05d}.json"


def create_cache(
    path: str | Path,
    *,
    fingerprint: dict[str, Any],
    token_shape: tuple[int, int],
    num_views: int,
    shard_size: int,
    label_names: list[str],
    num_seen: int,
    labels: np.ndarray | Callable[[int, int], np.ndarray],
    paths: list[str],
    manifest_index: np.ndarray,
    visual_proj: np.ndarray,
) -> Cache:
    """Create an empty store (all metadata, no tokens), whole or not at all (`Location.building`).

    `labels`: the (N, C) int8 matrix, or a function (start, stop) -> those rows, called a shard at a time (it may not
    fit in memory: docs/design.md, section 2).
    """
    n, c = len(paths), len(label_names)
    assert manifest_index.shape == (n,)
    t, d = token_shape
    shard = min(shard_size, max(n, 1))
    with Location.of(path).building() as tmp:
        group = tmp.open_group("w")
        shape, shards = (n, num_views, t, d), (shard, num_views, t, d)
        crc = [zarr.codecs.Crc32cCodec()]  # after `bytes`: each inner chunk is its raw bytes then their crc32c
        group.create_array("tokens", shape=shape, dtype="float16", chunks=(1, 1, t, d), shards=shards, compressors=crc)
        group.create_array("valid", shape=(n,), dtype="bool", chunks=(shard,), fill_value=False)
        label_array = group.create_array("labels", shape=(n, c), dtype="int8", chunks=(shard, max(1, c)))
        for start in range(0, n, shard):
            stop = min(start + shard, n)
            rows = labels(start, stop) if callable(labels) else labels[start:stop]
            assert rows.shape == (stop - start, c), rows.shape
            label_array[start:stop] = rows
        group.create_array("paths", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.asarray(paths, dtype=object)
        group.create_array("manifest_index", shape=(n,), dtype="int64", chunks=(max(n, 1),))[:] = manifest_index
        _write_float32(group, "visual_proj", visual_proj)
        group.attrs.update(fingerprint=fingerprint, labels=list(label_names), num_seen=int(num_seen), shard_size=shard)
        tmp.makedirs("done")
    return open_cache(path, mode="r+")


def _write_float32(group: zarr.Group, name: str, a: np.ndarray) -> None:
    """A small float32 array, one chunk."""
    group.create_array(name, shape=a.shape, dtype="float32", chunks=a.shape)[:] = a


def open_cache(path: str | Path, mode: str = "r") -> Cache:
    """Open a store written by `create_cache`; a missing or foreign store is one clear error."""
    location = Location.of(path)
    path = location.url
    if not location.exists("zarr.json"):
        raise QKSError("no feature cache here (run `qks extract` first)", path)
    try:
        group = location.open_group(mode)
        version = group.attrs["fingerprint"]["format_version"]
    except (KeyError, TypeError, ValueError) as e:
        raise QKSError(f"not a qks feature cache ({e})", path) from None
    if version not in READ_VERSIONS:
        raise QKSError(f"cache format version {version}, this qks reads versions {READ_VERSIONS}; rebuild it", path)
    missing = [name for name in ARRAYS if name not in group]
    if missing:
        raise QKSError(f"damaged feature cache: no {', '.join(missing)} array; rebuild it (--overwrite)", path)
    return Cache(path, group)


# ------------------------------------------------------------------------- the label store, and stage two's inputs
CLIP_EMBEDDINGS = "clip_embeddings"  # (C, E) the CLIP baseline's labels: one template, L2-normalised
LABEL_EMBEDDING = ("normalize", "num_templates", "templates_sha256")  # how the labels were embedded: must match


def write_label_embeddings(
    path: str | Path,
    label_names: list[str],
    embeddings: np.ndarray,
    fingerprint: dict[str, Any],
    clip_embeddings: np.ndarray | None = None,
    **attrs: Any,
) -> None:
    """Store label embeddings (C, E) float32 (and the CLIP baseline's) with the label list and backbone fingerprint."""
    assert embeddings.shape[0] == len(label_names)
    with Location.of(path).building() as tmp:
        group = tmp.open_group("w")
        _write_float32(group, "embeddings", embeddings)
        if clip_embeddings is not None:
            _write_float32(group, CLIP_EMBEDDINGS, clip_embeddings)
        group.attrs.update({"fingerprint": fingerprint, "labels": list(label_names), **attrs})


def read_label_embeddings(path: str | Path, array: str = "embeddings") -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Return (label names, `array` (C, E) float32, attributes incl. `fingerprint`)."""
    location = Location.of(path)
    if not location.exists("zarr.json"):
        raise QKSError("no label embeddings here (run `qks embed-labels` first)", location.url)
    group = location.open_group("r")
    attrs = dict(group.attrs)
    if attrs.get("fingerprint", {}).get("format_version") not in READ_VERSIONS:
        raise QKSError("label embeddings of another format version; rebuild them", location.url)
    if array not in group:
        raise QKSError(f"the label store has no {array} (an older `qks embed-labels` made it); rerun it", location.url)
    return list(attrs["labels"]), group[array][:], attrs


def check_label_names(path: str | Path, found: list[str], expected: list[str], what: str) -> None:
    """Refuse a label list that is not the expected one, naming the first difference."""
    if found == expected:
        return
    pairs = zip(found, expected, strict=False)
    i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(found), len(expected)))
    a, b = (names[i] if i < len(names) else "<end>" for names in (found, expected))
    raise QKSError(f"{what}: label {i} is {a!r}, {b!r} expected ({len(found)} labels vs {len(expected)})", path)


def check_label_embedding(path: str | Path, found: dict[str, Any], expected: dict[str, Any] | None) -> None:
    """Refuse labels embedded otherwise than a checkpoint's (`expected`: its `label_embedding`; None: not checked)."""
    keys = [k for k in LABEL_EMBEDDING if (expected or {}).get(k) is not None and found.get(k) != expected[k]]
    if keys:
        diffs = ", ".join(f"{k} {found.get(k)!r} vs {expected[k]!r}" for k in keys)
        raise QKSError(f"labels embedded otherwise than the checkpoint's ({diffs}); embed them with its pool", path)


@dataclass
class Inputs:
    """What a stage-two run reads, checked against each other: a feature store, the label store, maybe a test store."""

    cache: Cache  # the training store (train) or the test store (evaluate)
    test: Cache | None
    label_names: list[str]  # seen then unseen
    embeddings: np.ndarray  # (C, E) float32
    num_seen: int
    label_embedding: dict[str, Any]  # how the labels were embedded (`LABEL_EMBEDDING`): predict repeats it
    backbone_source: dict[str, str] | None  # the backbone's files, as embed-labels recorded them

    @property
    def backbone(self) -> dict[str, Any]:
        return self.cache.fingerprint["backbone"]


def check_split(cache: Cache, role: str, any_split: bool) -> None:
    """Refuse to train on a test store or to evaluate on a training store (the split stage one recorded)."""
    split = cache.fingerprint.get("data", {}).get("split")
    if any_split or split != {"train": "test", "test": "train"}[role]:
        return
    why = "training on it leaks the test set" if role == "train" else "evaluating on it scores training images"
    raise QKSError(f"a {split} store (its fingerprint says split {split!r}): {why}; --any-split overrides", cache.path)


def open_inputs(
    path: str | Path,
    labels_path: str | Path,
    test_path: str | Path | None = None,
    *,
    role: str = "train",
    any_split: bool = False,
) -> Inputs:
    """Open the store `path` (role `train` or `test`), the label store and the optional test store; refuse incomplete
    stores, the wrong split, other backbones, other label lists."""
    stores = [open_cache(p) for p in (path, test_path) if p is not None]
    for store, r in zip(stores, (role, "test"), strict=False):
        store.require_complete()
        check_split(store, r, any_split)
    cache, backbone = stores[0], {"backbone": stores[0].fingerprint["backbone"]}
    names, emb, attrs = read_label_embeddings(labels_path)
    check_fingerprint(labels_path, {"backbone": attrs["fingerprint"]["backbone"]}, backbone, f"label store vs {path}")
    check_label_names(labels_path, names, cache.label_names, f"label store vs {path}")
    for test in stores[1:]:
        check_fingerprint(test_path, {"backbone": test.fingerprint["backbone"]}, backbone, "test vs training store")
        check_label_names(test_path, test.label_names, cache.label_names, "test vs training store")
        if test.num_seen != cache.num_seen:
            raise QKSError(f"{test.num_seen} seen labels, the training store {cache.num_seen}", test_path)
    made = {k: attrs.get(k) for k in (*LABEL_EMBEDDING, "templates")} | {"normalize": bool(attrs.get("normalize"))}
    test = stores[1] if test_path is not None else None
    return Inputs(cache, test, names, emb, cache.num_seen, made, attrs.get("backbone_source"))


def size_on_disk(path: str | Path) -> int:
    """Bytes of all files (objects) under `path`."""
    return Location.of(path).size()


def cache_summary(cache: Cache) -> dict[str, Any]:
    """What `qks cache info` prints: shape, views, shards done/total, fingerprint summary, skipped count, size."""
    backbone, data = cache.fingerprint.get("backbone", {}), cache.fingerprint.get("data", {})
    return {
        "path": str(cache.path),
        "tokens": f"{cache.tokens.dtype} {tuple(cache.tokens.shape)} (images, views, tokens, dim)",
        "images": cache.num_images,
        "views": cache.num_views,
        "labels": f"{len(cache.label_names)} ({cache.num_seen} seen, {len(cache.label_names) - cache.num_seen} unseen)",
        "shards": f"{len(cache.done_shards())}/{cache.num_shards} done, {cache.shard_size} images each",
        "skipped": len(cache.skipped()),
        "model": describe_backbone(backbone),
        "data": ", ".join(f"{k}={str(v)[:16]}" for k, v in data.items()),
        "size_on_disk": f"{cache.location.size() / 2**20:.1f} MiB",
    }


def _verify_shard(cache: Cache, reader: Reader, shard: int, paths: np.ndarray) -> list[str]:
    rows = cache.shard_rows(shard)
    record = cache.done_record(shard)
    if record.get("rows") != [rows.start, rows.stop]:
        return [f"shard {shard}: marker rows {record.get('rows')} != {[rows.start, rows.stop]}"]
    valid, problems = cache.valid[rows], []
    skipped = {s["path"] for s in record["skipped"]}
    invalid = set(paths[rows][~valid].tolist())
    if invalid != skipped:
        problems.append(f"shard {shard}: {len(invalid)} rows not valid but {len(skipped)} images recorded as skipped")
    v, sample = cache.num_views, cache.tokens.shape[2:]
    for start in range(rows.start, rows.stop, VERIFY_ROWS):  # a piece at a time: a shard can be GBs
        n = min(VERIFY_ROWS, rows.stop - start)
        tokens = np.empty((n * v, *sample), np.float16)  # (n x V, T, D)
        try:
            reader.read(np.repeat(np.arange(start, start + n), v), np.tile(np.arange(v), n), tokens)
        except QKSError as e:
            return [*problems, f"shard {shard}: {e}"]
        except Exception as e:  # a damaged shard surfaces as any of zarr's, TensorStore's or numcodecs' errors
            return [*problems, f"shard {shard}: unreadable ({type(e).__name__}: {e})"]
        tokens, ok = tokens.reshape(n, -1), valid[start - rows.start : start - rows.start + n]  # (n, V x T x D)
        for i in start + np.flatnonzero(ok & ~tokens.any(axis=1)):
            problems.append(f"shard {shard}: row {i} ({paths[i]}) is valid but all zero")
        if not np.isfinite(tokens[ok]).all():
            problems.append(f"shard {shard}: non-finite tokens in rows {start}-{start + n - 1}")
    return problems


def verify_cache(cache: Cache) -> list[str]:
    """Every problem found: missing or inconsistent done markers, damaged shards (every chunk's checksum from format
    version 2 on), valid/skipped mismatches, valid rows of zeros."""
    done, shards = cache.done_shards(), set(range(cache.num_shards))
    problems = [f"shard {s}: no done marker (not extracted)" for s in sorted(shards - done)]
    problems += [f"done marker {s:05d}.json names no shard of this store" for s in sorted(done - shards)]
    paths, reader = cache.paths[:], open_reader(cache.location, cache.tokens)
    for shard in sorted(done & shards):
        problems += _verify_shard(cache, reader, shard, paths)
    return problems
