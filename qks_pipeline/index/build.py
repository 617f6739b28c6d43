"""Building the query index (`qks index`): the Q-Former runs once per cached image and its projected
query outputs z are stored (`qks_pipeline.index.store`).

A shard of the feature store is the unit of work, as in stage one: `shard_z` computes one shard's z,
written whole and then marked done, so a rerun computes only the shards not done and equals an
uninterrupted run; a done shard whose z chunk is gone is computed again. Memory: one shard of z and
the loader's batches, whatever N is. The shards run in this process or on a dask cluster, one task
per shard (`stage_one.cluster.connect`).
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from qks_pipeline.config import IndexConfig
from qks_pipeline.devices import resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.index.store import (
    IndexStore,
    check_version,
    checkpoint_identity,
    create_index,
    index_fingerprint,
    is_index,
    open_index,
)
from qks_pipeline.stage_two.checkpoint import load as load_checkpoint
from qks_pipeline.stage_two.loader import open_loader
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.store.features import Cache, open_cache
from qks_pipeline.store.fingerprint import check_fingerprint, differing_keys
from qks_pipeline.store.location import Location, is_url

log = logging.getLogger(__name__)

REBUILD = "--overwrite or --replace-stale rebuilds it"


@dataclass
class BuildResult:
    """What one `build_index` call did."""

    images: int  # rows in the index
    computed: int  # images whose z this call computed (0 when the index was complete)
    shards_written: int
    seconds: float  # computing and writing the shards

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def shard_z(model: QKS, cache: Cache, shard: int, batch_size: int) -> np.ndarray:
    """One shard's z (S, Q, E) float32: the head's projected query outputs of its valid rows, zeros
    for the others."""
    rows = cache.shard_rows(shard)
    device = model.proj.device
    loader = open_loader(
        cache,
        rows=(rows.start, rows.stop),
        batch_size=batch_size,
        shuffle=False,
        pin_memory=device.type == "cuda",
    )
    out = np.zeros((rows.stop - rows.start, model.cfg.num_queries, model.proj.shape[1]), np.float32)
    for batch in loader.epoch(0):
        tokens = batch.tokens.to(device, non_blocking=True).float()
        z = model.query_features(tokens) @ model.proj  # (B, Q, D) @ (D, E) -> (B, Q, E)
        out[batch.rows - rows.start] = z.cpu().numpy()
    return out


def _refuse_stale(
    location: Location, found: dict[str, Any], fingerprint: dict[str, Any], replace_stale: bool
) -> None:
    """Refuse an index built otherwise (its fingerprint `found`), in one line, unless
    `replace_stale`."""
    if replace_stale:
        log.info("%s was built differently; rebuilding it (--replace-stale)", location.url)
        return
    check_version(found, location.url)
    if diffs := differing_keys(found.get("checkpoint", {}), fingerprint["checkpoint"]):
        what = ", ".join(f"{key} {str(a)[:12]} vs {str(b)[:12]}" for key, a, b in diffs)
        message = f"query index built from another checkpoint ({what}); {REBUILD}"
        raise QKSError(message, location.url)
    check_fingerprint(location.url, found, fingerprint, "query index", hint=REBUILD)


def _resume(location: Location, out: str | Path) -> IndexStore:
    """The index `out`, built the same way, without what interrupted writes left; the done shards
    whose z chunk is gone are marked not done."""
    index = open_index(out, mode="r+")
    location.remove_interrupted_writes()
    if lost := index.lost_shards():
        log.warning(
            "%d done shard(s) lost their z chunk (e.g. shard %d); computing them again",
            len(lost),
            min(lost),
        )
    return index


def _open_index(
    out: str | Path,
    cache: Cache,
    fingerprint: dict[str, Any],
    model: QKS,
    checkpoint: Path,
    config: dict[str, Any],
    **how: Any,
) -> tuple[IndexStore, np.ndarray | None]:
    """Resume the index `out` if built the same way (removing what interrupted writes left), else
    refuse it or build a new one, returned with its first shard's z (S, Q, E), computed to centre
    it on, for the caller to write. Anything but an index is never replaced."""
    location = Location.of(out)
    if location.holds_store():
        if not is_index(location):
            message = "holds a Zarr store that is not a query index; refusing to replace it"
            raise QKSError(message, location.url)
        if not how["overwrite"]:
            # read as it is: an index of another format version is refused or replaced
            found = location.open_group("r").attrs["index"]
            if found == fingerprint:
                return _resume(location, out), None
            _refuse_stale(location, found, fingerprint, how["replace_stale"])
    # the first shard's images give the mean the index is centred on
    first = shard_z(model, cache, 0, how["batch_size"]) if cache.num_images else None
    valid = np.asarray(cache.valid[cache.shard_rows(0)], dtype=bool)
    shape = (model.cfg.num_queries, int(model.proj.shape[1]))
    centre = valid.any() and fingerprint["precision"] == "fp16"  # fp32 keeps z as it is
    mean = first[valid].mean(axis=0, dtype=np.float64) if centre else np.zeros(shape)
    index = create_index(
        out,
        cache,
        fingerprint=fingerprint,
        z_mean=mean.astype(np.float32),
        checkpoint_dir=checkpoint,
        checkpoint_config=config,
    )
    return index, first


def _run_here(
    model: QKS, cache: Cache, index: IndexStore, shards: list[int], batch_size: int, bar: tqdm
) -> None:
    """Compute the shards in order, each written by a thread while the next one is computed."""
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as writer:
        for shard in shards:
            z = shard_z(model, cache, shard, batch_size)
            if pending is not None:
                pending.result()  # at most one shard in flight: bounded memory, errors surface here
            pending = writer.submit(index.write_shard, shard, z)
            bar.update(cache.num_rows([shard]))
        if pending is not None:
            pending.result()


@dataclass(frozen=True)
class IndexShardJob:
    """What a dask worker needs besides the shard number."""

    index: str  # absolute local path, or URL
    store: str
    checkpoint: str  # absolute
    batch_size: int
    device: str  # as given: each worker resolves it


@functools.lru_cache(maxsize=1)
def _worker_head(checkpoint: str, device: str) -> QKS:
    """The head, loaded once per worker process."""
    return load_checkpoint(checkpoint, resolve_device(device))[0]


def build_shard(shard: int, job: IndexShardJob) -> str | None:
    """The dask task: compute and write one shard. Returns a user error's line (not raised, so that
    dask does not retry it), else None."""
    try:
        index = open_index(job.index, mode="r+")
        model = _worker_head(job.checkpoint, job.device)
        z = shard_z(model, open_cache(job.store), shard, job.batch_size)
        index.write_shard(shard, z)
    except QKSError as e:
        return e.message
    return None


def _absolute(location: str | Path) -> str:
    return location if is_url(location) else str(Path(location).resolve())


def _run_on_cluster(
    cluster: str, job: IndexShardJob, cache: Cache, shards: list[int], bar: tqdm
) -> None:
    """One task per shard; every shard that can finish does, then the failures are raised
    together."""
    from qks_pipeline.stage_one.cluster import as_completed, connect

    if not shards:
        return
    failures = []
    with connect(cluster) as client:
        futures = client.map(build_shard, shards, job=job, retries=2, pure=False)
        shard_of = {future.key: shard for future, shard in zip(futures, shards, strict=True)}
        for future in as_completed(futures):
            try:
                error = future.result()
            except Exception as e:  # raised by the task after its retries (a lost worker)
                error = f"{type(e).__name__}: {e} (after 2 retries)"
            if error:
                failures.append(f"shard {shard_of[future.key]}: {error}")
            bar.update(cache.num_rows([shard_of[future.key]]))
    if failures:
        done = f"{len(failures)} of {len(shards)} shard(s) failed, the others are done (rerun)"
        raise QKSError(f"{done}: {'; '.join(failures[:3])}")


def build_index(
    checkpoint: str | Path,
    cache_path: str | Path,
    out: str | Path,
    *,
    params: IndexConfig | None = None,
    device: str = "auto",
    overwrite: bool = False,
    replace_stale: bool = False,
    cluster: str | None = None,
    progress: bool = False,
) -> BuildResult:
    """Build (or resume building) the query index of a feature store with a trained head.

    Args:
        checkpoint: A `qks train` (or `qks import-checkpoint`) output directory.
        cache_path: A complete feature store (stage one) of the images to index: a path or a URL.
        out: The index to write: a local directory or an fsspec URL.
        params: The `index` section of params.yaml (precision, batch size).
        device: Where the head runs here ("auto", "cpu", "cuda[:N]"); on a cluster, what each
            worker resolves.
        overwrite: Rebuild the index even if it is complete.
        replace_stale: Rebuild an index built from another checkpoint, store or precision; resume
            one built the same (what a DVC stage wants). Without it such an index is refused.
        cluster: "local:N" or a dask scheduler address: one task per shard there.
        progress: Show a progress bar.

    Returns:
        What this call computed.
    """
    params = params or IndexConfig()
    checkpoint = Path(checkpoint)
    with Location.of(out).writer_lock("index build", "index"):
        model, config = load_checkpoint(checkpoint, resolve_device("cpu" if cluster else device))
        cache = open_cache(cache_path)
        cache.require_complete()
        check_fingerprint(
            cache_path,
            {"backbone": cache.fingerprint["backbone"]},
            {"backbone": config["fingerprint"]},
            "feature store vs checkpoint",
        )
        identity = checkpoint_identity(checkpoint, config)
        fingerprint = index_fingerprint(identity, cache.fingerprint, params.precision)
        start = time.perf_counter()
        how = {"overwrite": overwrite, "replace_stale": replace_stale}
        how["batch_size"] = params.batch_size
        index, first = _open_index(out, cache, fingerprint, model, checkpoint, config, **how)
        todo = sorted(set(range(index.num_shards)) - index.done_shards())
        bar = tqdm(total=cache.num_rows(todo), unit="img", desc="index", disable=not progress)
        with bar:
            if first is not None:  # a new index: its first shard is computed
                index.write_shard(0, first)
                bar.update(cache.num_rows([0]))
            rest = todo[1:] if first is not None else todo
            if cluster:
                where = (_absolute(out), _absolute(cache_path), str(checkpoint.resolve()))
                job = IndexShardJob(*where, params.batch_size, device)
                _run_on_cluster(cluster, job, cache, rest, bar)
            else:
                _run_here(model, cache, index, rest, params.batch_size, bar)
    seconds = time.perf_counter() - start
    return BuildResult(index.num_images, cache.num_rows(todo), len(todo), seconds)
