"""Stage one on a dask cluster: one task per shard, one writer per shard, resumable exactly like the single-process run.

`qks extract ... --cluster local:N` starts a LocalCluster of N worker processes with one thread each (dask's nanny sets
OMP_NUM_THREADS=1, so torch also runs one thread per worker); `--cluster tcp://HOST:PORT` joins a running scheduler.
The client opens or creates the store, as the single-process path does, and submits `run_shard` for every shard
without a done marker. Each worker loads the backbone once (memoised per worker process), checks it against the
store's fingerprint, decodes its shard's images in `--workers` threads (a dask worker is a daemon process and cannot
start DataLoader processes), runs the forward pass (`extract.shard_tokens`, the single-process path's own per-shard
function), writes the whole shard and then its done marker. The store is the same, byte for byte, as a
single-process run's. A task that fails (a worker lost, an I/O error) is retried `retries` times; a user error (an
unreadable image under --strict, another backbone on a worker) is not. A failed shard does not stop the others; the
failures are reported together at the end. Finished shards stay finished: rerunning the command resumes.

Every worker must see the same images, weights file and store: on several machines, use a shared filesystem or a store
URL (`s3://...`, see `qks_pipeline.storage`) and the same image root and weights path on each machine (the client
passes absolute paths).

One worker per GPU: give each worker one GPU and one thread, so it runs one shard at a time on its GPU. With dask-cuda,
`dask-cuda-worker tcp://SCHEDULER:8786` on each machine starts one worker per visible GPU, each pinned to its GPU
through CUDA_VISIBLE_DEVICES (in Python: `LocalCUDACluster()`, then pass `Client(cluster)` as `cluster=`). Without
dask-cuda, start one worker per GPU yourself: `CUDA_VISIBLE_DEVICES=i dask worker tcp://SCHEDULER:8786 --nthreads 1
--resources GPU=1`; when the workers declare a GPU resource, every shard task asks for one GPU, so a worker runs one
shard at a time whatever its thread count, and workers without a GPU get none. Then `qks extract ... --cluster
tcp://SCHEDULER:8786 --device cuda --workers 8`: on a GPU, decoding is the bottleneck, so give each worker several
decoding threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import torch

from qks_pipeline.backbone import backbone_fingerprint, load_backbone
from qks_pipeline.cache import Cache, check_fingerprint, open_cache
from qks_pipeline.config import BackboneConfig, ExtractConfig
from qks_pipeline.devices import resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.extract import (
    Forward,
    effective_precision,
    extract_shard,
    make_dataset,
    progress_bar,
)
from qks_pipeline.storage import is_url

try:
    from distributed import Client, LocalCluster, as_completed
except ImportError:  # optional: only a cluster run needs it
    Client = LocalCluster = as_completed = None

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30


@contextlib.contextmanager
def connect(cluster: str | Any) -> Iterator[Any]:
    """A `distributed.Client` for `cluster`: "local:N" (a LocalCluster of N processes, 1 thread each, closed on exit),
    a scheduler address ("tcp://host:8786"), or a Client (used as it is, left open)."""
    if Client is None:
        raise QKSError("a cluster run needs dask.distributed: pip install distributed")
    if not isinstance(cluster, str):
        yield cluster
        return
    if match := re.fullmatch(r"local:(\d+)", cluster):
        if int(match[1]) < 1:
            raise QKSError(f"--cluster {cluster}: a local cluster needs at least one worker")
        with local_cluster(int(match[1])) as local, Client(local) as client:
            log.info("local dask cluster of %s worker(s), dashboard %s", match[1], client.dashboard_link)
            yield client
        return
    if "://" not in cluster:
        raise QKSError(f"--cluster must be local:N or a scheduler address such as tcp://HOST:8786, got {cluster!r}")
    try:
        client = Client(cluster, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        raise QKSError(f"cannot reach the dask scheduler ({e})", cluster) from None
    with client:
        yield client


def local_cluster(workers: int) -> Any:
    """N worker processes with one thread each, on 127.0.0.1. Without dask's MALLOC_TRIM_THRESHOLD_: it makes glibc
    return every freed activation buffer to the system and fault it in again, 15% slower forward passes here."""
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address="127.0.0.1:0")  # fmt: skip


def _device_type(device: str) -> str:
    return resolve_device(device).type


def cluster_device(client: Any, device: str) -> torch.device:
    """The device the workers resolve `device` to; they must agree, as it decides the precision the store records."""
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise QKSError(f"the dask cluster has no workers (waited {CONNECT_TIMEOUT_S} s)") from None
    found = set(client.run(_device_type, device).values())
    if len(found) != 1:
        raise QKSError(f"the dask workers resolve --device {device} differently: {', '.join(sorted(found))}")
    return torch.device(found.pop())


def _absolute(path: str | None, is_path: Callable[[str], bool]) -> str | None:
    return str(Path(path).resolve()) if path is not None and is_path(path) else path


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs besides the shard number; views, seed and precision it reads from the store."""

    store: str  # absolute local path, or URL
    images_root: str  # absolute
    model: str  # open_clip name, or absolute path of a config JSON
    pretrained: str | None  # tag, absolute weights path, or none
    device: str  # as given: each worker resolves it
    cfg: ExtractConfig  # batch_size; workers = decoding threads per dask worker
    strict: bool

    @classmethod
    def of(cls, cache: Cache, images_root: Path, backbone: BackboneConfig, cfg: ExtractConfig, device: str,
           strict: bool) -> ShardJob:  # fmt: skip
        store = cache.path if is_url(cache.path) else str(Path(cache.path).resolve())
        model = _absolute(backbone.model, lambda p: p.endswith(".json"))
        pretrained = _absolute(backbone.pretrained, lambda p: Path(p).is_file())
        return cls(store, str(images_root.resolve()), model, pretrained, device, cfg, strict)


@dataclass(frozen=True)
class ShardDone:
    """A task's outcome. A user error is returned, not raised, so that dask does not retry it."""

    shard: int
    rows: int
    forward_seconds: float
    error: str | None = None


@functools.lru_cache(maxsize=1)
def _backbone(model: str, pretrained: str | None, device: str) -> tuple[torch.nn.Module, Callable, dict[str, Any]]:
    """(clip, preprocess, backbone fingerprint), loaded once per worker process and kept while it is asked for."""
    clip, preprocess, _ = load_backbone(model, pretrained, resolve_device(device))
    return clip, preprocess, backbone_fingerprint(clip, model, pretrained)


def run_shard(shard: int, job: ShardJob) -> ShardDone:
    """The task: compute and write one shard on this worker (`extract.extract_shard`)."""
    try:
        cache = open_cache(job.store, mode="r+")
        clip, preprocess, fingerprint = _backbone(job.model, job.pretrained, job.device)
        check_fingerprint(job.store, cache.fingerprint["backbone"], fingerprint, "feature cache vs a worker's backbone")
        device = next(clip.parameters()).device
        precision = cache.fingerprint["data"]["precision"]
        if effective_precision(precision, device) != precision:
            raise QKSError(f"the store records precision {precision}, which a worker on {device} cannot run")
        forward = Forward(clip, device, precision)
        dataset = make_dataset(cache, Path(job.images_root), clip, preprocess)
        rows = extract_shard(cache, shard, dataset, forward, job.cfg, job.strict)
    except QKSError as e:
        return ShardDone(shard, 0, 0.0, e.format_message())
    return ShardDone(shard, rows, forward.seconds)


def run_on_cluster(client: Any, cache: Cache, shards: list[int], job: ShardJob, retries: int) -> tuple[int, float]:
    """Run `run_shard` for `shards`, one task each; progress (images/s, ETA) as shards finish.

    A failed shard does not stop the others: every shard that can finish does, then the failures are raised together
    (a rerun retries them). So no task of this run is still writing when this returns; after an interrupt, tasks
    already running on a shared cluster finish their shard (whole, then marked done) while the rest are cancelled.

    Returns:
        (images computed, forward-pass seconds per worker).
    """
    if not shards:
        return 0, 0.0
    info = client.scheduler_info()["workers"].values()
    workers = max(1, len(info))
    gpu = {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in info) else None  # started --resources GPU=1
    log.info("extracting %d shard(s) on %d dask worker(s)", len(shards), workers)
    futures = client.map(run_shard, shards, job=job, retries=retries, pure=False, resources=gpu)
    shard_of = {future.key: shard for future, shard in zip(futures, shards, strict=True)}
    total, seconds, failures = 0, 0.0, []
    with progress_bar(sum(cache.shard_rows(s).stop - cache.shard_rows(s).start for s in shards)) as bar:
        try:
            for future in as_completed(futures):
                done = _outcome(future, shard_of[future.key], retries)
                if done.error:
                    failures.append(f"shard {done.shard}: {done.error}")
                bar.update(done.rows)
                total, seconds = total + done.rows, seconds + done.forward_seconds
        except BaseException:  # an interrupt
            client.cancel(futures)
            raise
    if failures:
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise QKSError(f"{len(failures)} of {len(shards)} shard(s) failed, the others are done (rerun to resume): "
                       + "; ".join(failures[:3]) + more)  # fmt: skip
    return total, seconds / workers


def _outcome(future: Any, shard: int, retries: int) -> ShardDone:
    """The task's result; an exception it raised (after its retries; a lost worker is a KilledWorker) as an error."""
    try:
        return future.result()
    except Exception as e:
        return ShardDone(shard, 0, 0.0, f"{type(e).__name__}: {e} (after {retries} retries)")
