"""Distributed extraction: 1 and 2 dask workers against each other and the single-process path.

All in one run: each extracts the same synthetic JPEGs (files -> decode -> forward -> whole-shard
writes -> done markers) into a new store. Thread settings, so that the comparisons are fair on a
2-core machine:
- single process, 1 thread: torch.set_num_threads(1), decoding in the same thread (--workers 0);
- dask, N workers: `--cluster local:N`, N worker processes with 1 thread each (dask's nanny sets
  OMP_NUM_THREADS=1, so torch runs one thread per worker), decoding in the task's thread
  (--workers 0);
- single process, 2 threads + 1 DataLoader worker: how one would use this machine without dask (for
  reference).
"dask 1 worker / single 1 thread" is dask's overhead; "dask 2 workers / dask 1 worker" is the
scaling. Each cluster is started once and warmed by one run (its workers load the backbone then,
once per process, as in a real run); timed runs then alternate between the configurations and the
best of each is reported, with the machine's 1-minute load average after each run (2 cores: a load
above 2 means other work competed). images/s = images / loop time (model loading and cluster
start-up excluded; they are printed separately). Random weights: speed does not depend on them.

    # ViT-B-32, 96 JPEGs of 500x375, shards of 16
    .venv/bin/python -m benchmarks.bench_distributed
    .venv/bin/python -m benchmarks.bench_distributed --model ViT-B-16 --images 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch
from distributed import Client

from benchmarks.bench_extract import make_dataset
from qks_pipeline.config import BackboneConfig, ExtractConfig
from qks_pipeline.stage_one.cluster import OnCluster, local_cluster
from qks_pipeline.stage_one.extract import extract


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--size", type=int, nargs=2, default=(500, 375), help="width height of the JPEGs on disk"
    )
    args = ap.parse_args()
    backbone = BackboneConfig(args.model, "none")
    cfg0 = ExtractConfig(batch_size=args.batch_size, workers=0, shard_size=args.shard_size)
    cfg1 = ExtractConfig(batch_size=args.batch_size, workers=1, shard_size=args.shard_size)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        dataset, images = make_dataset(Path(tmp), args.images, tuple(args.size))
        runs = 0

        def run(cfg: ExtractConfig, cluster: Client | None = None) -> float:
            nonlocal runs
            runs += 1
            out = Path(tmp) / f"out{runs}.zarr"
            runner = OnCluster(cluster, "cpu") if cluster is not None else None
            result = extract(
                dataset,
                "train",
                images,
                out,
                backbone=backbone,
                cfg=cfg,
                device="cpu",
                runner=runner,
            )
            assert result.computed == args.images
            return result.images_per_second

        clients = {}
        # seconds to start each cluster, its warm-up run included
        startup = {}
        for n in (1, 2):
            start = time.perf_counter()
            cluster = stack.enter_context(local_cluster(n))  # what --cluster local:N starts
            clients[n] = stack.enter_context(Client(cluster))
            run(cfg0, clients[n])  # warm-up: each worker loads the backbone once
            startup[n] = time.perf_counter() - start
        configs = {
            "single process, 1 thread": lambda: _with_threads(1, run, cfg0),
            "dask, 1 worker x 1 thread": lambda: run(cfg0, clients[1]),
            "dask, 2 workers x 1 thread": lambda: run(cfg0, clients[2]),
            "single process, 2 threads + 1 decoder": lambda: _with_threads(2, run, cfg1),
        }
        speed = {name: [] for name in configs}
        load = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, go in configs.items():
                speed[name].append(go())
                # the 1-minute load average: other work on the machine shows
                load[name].append(os.getloadavg()[0])
    best = {name: max(v) for name, v in speed.items()}
    tasks = -(-args.images // args.shard_size)
    print(
        f"model {args.model} (random weights), {args.images} JPEGs {args.size[0]}x{args.size[1]}, "
        f"batch {args.batch_size}, shards of {args.shard_size} ({tasks} tasks), "
        f"{args.repeats} timed runs each, best reported"
    )
    for name, values in speed.items():
        runs = ", ".join(
            f"{v:.2f} at load {x:.1f}" for v, x in zip(values, load[name], strict=True)
        )
        print(f"{name:>42}: {best[name]:7.2f} images/s  ({runs})")
    single1 = best["single process, 1 thread"]
    single2 = best["single process, 2 threads + 1 decoder"]
    dask1 = best["dask, 1 worker x 1 thread"]
    dask2 = best["dask, 2 workers x 1 thread"]
    print(f"{'overhead: dask 1 worker / single 1 thread':>42}: {dask1 / single1:7.3f}")
    print(f"{'scaling: dask 2 workers / dask 1 worker':>42}: {dask2 / dask1:7.3f}")
    print(f"{'dask 2 workers / single 2 threads':>42}: {dask2 / single2:7.3f}")
    print(
        f"cluster start-up with one warm-up run: 1 worker {startup[1]:.1f} s, "
        f"2 workers {startup[2]:.1f} s"
    )


def _with_threads(n: int, run, cfg: ExtractConfig) -> float:
    with torch_threads(n):
        return run(cfg)


if __name__ == "__main__":
    main()
