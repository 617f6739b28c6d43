"""Stage one on a dask cluster: one task and one writer per shard.

`extract.extract(..., runner=OnCluster(cluster))`, or `qks extract --cluster`. The store is byte for
byte the single-process run's, and resumable the same way.

Each worker loads the backbone once per process, checks it against the store's fingerprint, decodes
its shard's images in threads (a dask worker, a daemon process, cannot start DataLoader processes)
and writes the shard. A lost worker or an I/O error is retried, a user error is not; failures are
reported together once every other shard is done. How to start workers (one per GPU): README.md,
"Scaling out".
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import torch
from torch.utils.data import default_collate

from qks_pipeline.config import ExtractConfig
from qks_pipeline.devices import resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_one.backbone import Backbone, load_backbone
from qks_pipeline.stage_one.extract import (
    Forward,
    ImageBatch,
    ImageViews,
    effective_precision,
    make_dataset,
    progress_bar,
    shard_batches,
    shard_tokens,
)
from qks_pipeline.store.features import Cache, open_cache
from qks_pipeline.store.fingerprint import check_fingerprint
from qks_pipeline.store.location import is_url

try:
    from distributed import Client, LocalCluster, as_completed
except ImportError:  # optional: only a cluster run needs it
    Client = LocalCluster = as_completed = None

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30


@contextlib.contextmanager
def connect(cluster: str | Any) -> Iterator[Any]:
    """A `distributed.Client` for `cluster`.

    `cluster` is "local:N" (a LocalCluster of N processes, 1 thread each, closed on exit), a
    scheduler address ("tcp://host:8786"), or a Client (used as it is, left open).
    """
    if Client is None:
        raise QKSError("a cluster run needs dask.distributed: pip install distributed")
    if not isinstance(cluster, str):
        yield cluster
    elif match := re.fullmatch(r"local:(\d+)", cluster):
        if int(match[1]) < 1:
            raise QKSError(f"--cluster {cluster}: a local cluster needs at least one worker")
        with local_cluster(int(match[1])) as local, Client(local) as client:
            log.info(
                "local dask cluster of %s worker(s), dashboard %s", match[1], client.dashboard_link
            )
            yield client
    elif "://" not in cluster:
        raise QKSError(
            "--cluster must be local:N or a scheduler address such as tcp://HOST:8786, "
            f"got {cluster!r}"
        )
    else:
        try:
            client = Client(cluster, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise QKSError(f"cannot reach the dask scheduler ({e})", cluster) from None
        with client:
            yield client


def local_cluster(workers: int) -> Any:
    """N worker processes with one thread each, on 127.0.0.1.

    Without dask's MALLOC_TRIM_THRESHOLD_ (docs/design.md, section 3).
    """
    where = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, **where)


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs besides the shard number (views, seed, precision: from the store)."""

    store: str  # absolute local path, or URL
    images_root: str  # absolute
    model: str  # open_clip name, or absolute path of a config JSON (`Backbone.source`)
    pretrained: str  # tag, absolute weights path, or none
    device: str  # as given: each worker resolves it
    cfg: ExtractConfig  # batch_size; workers = decoding threads per dask worker
    strict: bool


@dataclass(frozen=True)
class ShardDone:
    """A task's outcome. A user error is returned, not raised, so that dask does not retry it."""

    rows: int
    forward_seconds: float
    error: str | None = None


def _decoded_batches(
    dataset: ImageViews, batches: list[list[int]], threads: int
) -> Iterator[ImageBatch]:
    """`batches` of rows decoded by `threads` threads, at most two batches ahead.

    PIL and torch release the GIL; 0 threads decode in line. Collated as a DataLoader collates, so
    the forward pass sees the same tensors.
    """
    if threads == 0:
        yield from (default_collate([dataset[row] for row in rows]) for rows in batches)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        ahead: collections.deque = collections.deque()
        for rows in batches:
            ahead.append([pool.submit(dataset.__getitem__, row) for row in rows])
            if len(ahead) > 2:
                yield default_collate([f.result() for f in ahead.popleft()])
        while ahead:
            yield default_collate([f.result() for f in ahead.popleft()])


@functools.lru_cache(maxsize=1)
def _backbone(model: str, pretrained: str, device: str) -> Backbone:
    """The backbone, loaded once per worker process and kept while it is asked for."""
    return load_backbone(model, pretrained, resolve_device(device))


def run_shard(shard: int, job: ShardJob) -> ShardDone:
    """The task: compute and write one shard here, decoding in `job.cfg.workers` threads."""
    try:
        cache = open_cache(job.store, mode="r+")
        backbone = _backbone(job.model, job.pretrained, job.device)
        check_fingerprint(
            job.store,
            cache.fingerprint["backbone"],
            backbone.fingerprint,
            "feature cache vs a worker's",
        )
        device = next(backbone.model.parameters()).device
        precision = cache.fingerprint["data"]["precision"]
        if effective_precision(precision, device) != precision:
            raise QKSError(
                f"the store records precision {precision}, which a worker on {device} cannot run"
            )
        forward = Forward(backbone.model, device, precision)
        dataset = make_dataset(cache, Path(job.images_root), backbone, job.cfg.max_pixels)
        rows = shard_batches(cache, [shard], job.cfg.batch_size)
        batches = _decoded_batches(dataset, rows, job.cfg.workers)
        out = shard_tokens(cache, shard, batches, dataset, forward, job.strict)
        cache.write_shard(shard, *out)
    except QKSError as e:
        return ShardDone(rows=0, forward_seconds=0.0, error=e.message)
    return ShardDone(rows=len(out[1]), forward_seconds=forward.seconds)


@dataclass
class OnCluster:
    """The runner of `extract.extract` that computes the shards on a dask cluster, a task each."""

    # "local:N", a scheduler address ("tcp://host:8786"), or a `distributed.Client` (`connect`)
    cluster: str | Any
    device: str = "auto"  # what each worker resolves for its forward passes
    # how often a failing shard is retried (a user error such as --strict's is not)
    retries: int = 2
    # the client loads the backbone on the CPU, for its fingerprint and projection only
    loads_here = False

    @contextlib.contextmanager
    def connect(self) -> Iterator[torch.device]:
        """Yields the device the workers resolve `device` to; they must agree on its type.

        The device decides the store's precision.
        """
        with connect(self.cluster) as self.client:
            try:
                self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise QKSError(
                    f"the dask cluster has no workers (waited {CONNECT_TIMEOUT_S} s)"
                ) from None
            resolved = self.client.run(resolve_device, self.device).values()
            found = {device.type for device in resolved}
            if len(found) != 1:
                raise QKSError(
                    f"the dask workers resolve --device {self.device} differently: "
                    f"{', '.join(sorted(found))}"
                )
            yield torch.device(found.pop())

    def run(
        self,
        cache: Cache,
        shards: list[int],
        backbone: Backbone,
        images: Path,
        cfg: ExtractConfig,
        strict: bool,
    ) -> float:
        """Run `run_shard` for `shards`, one task each; return the forward-pass seconds per worker.

        Every shard that can finish does, then the failures are raised together: no task of this run
        is still writing when this returns. After an interrupt, tasks already running finish their
        shard; the rest are cancelled.
        """
        if not shards:
            return 0.0
        store = cache.path if is_url(cache.path) else str(Path(cache.path).resolve())
        job = ShardJob(
            store=store,
            images_root=str(images.resolve()),
            model=backbone.source["model"],
            pretrained=backbone.source["pretrained"],
            device=self.device,
            cfg=cfg,
            strict=strict,
        )
        info = self.client.scheduler_info()["workers"].values()
        workers = max(1, len(info))
        # workers started with --resources GPU=1 run one task at a time
        gpu = {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in info) else None
        log.info("extracting %d shard(s) on %d dask worker(s)", len(shards), workers)
        futures = self.client.map(
            run_shard, shards, job=job, retries=self.retries, pure=False, resources=gpu
        )
        with progress_bar(cache.num_rows(shards)) as bar:
            seconds, failures = self._wait(futures, shards, bar)
        if failures:
            more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
            done = f"{len(failures)} of {len(shards)} shard(s) failed, the others are done"
            raise QKSError(f"{done} (rerun to resume): {'; '.join(failures[:3])}{more}")
        return seconds / workers

    def _wait(self, futures: list, shards: list[int], bar: Any) -> tuple[float, list[str]]:
        """Each task's outcome as it completes: the forward-pass seconds summed, and the failures.

        An interrupt cancels the tasks (those already running finish their shard).
        """
        shard_of = {future.key: shard for future, shard in zip(futures, shards, strict=True)}
        seconds = 0.0
        failures = []
        try:
            for future in as_completed(futures):
                try:
                    done = future.result()
                except Exception as e:
                    # raised by the task after its retries; a lost worker is a KilledWorker
                    error = f"{type(e).__name__}: {e} (after {self.retries} retries)"
                    done = ShardDone(rows=0, forward_seconds=0.0, error=error)
                if done.error:
                    failures.append(f"shard {shard_of[future.key]}: {done.error}")
                bar.update(done.rows)
                seconds += done.forward_seconds
        except BaseException:  # an interrupt
            self.client.cancel(futures)
            raise
        return seconds, failures
