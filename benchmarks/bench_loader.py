"""The training loader against the disk: one epoch of the loader vs a raw sequential read of the
same shard files.

Writes a synthetic ViT-B/16-sized store (197 x 768 float16 tokens, 1,024 images a shard, 1,006
labels; about 0.3 MB an image) of `--gb` GiB through the project's own cache API (reused when
present), then, `--rounds` times, one pass each of: the raw read (`open` + `readinto` of every shard
file in 16 MiB pieces, all bytes, index included), the loader in store order (validation,
evaluation) and the loader shuffled (training), each with the page cache warm and cold (the shard
files' pages dropped before the pass with `posix_fadvise(DONTNEED)`, which needs no root). Passes
are interleaved so that all see the same load on a shared machine; rates are medians over the
rounds, ratios the medians of each round's pass against the same round's raw read; the CPU time per
image (all threads) is less sensitive to the load. As in training, the in-order and shuffled loaders
are made once and read an epoch a round: their first epoch checks each chunk's crc32c, later ones do
not. "shuffled, first epoch" is a new loader every pass: what a first epoch costs (checksums,
buffers allocated). No model: this is what the loader can deliver.

Usage: .venv/bin/python -m benchmarks.bench_loader [--gb 1] [--rounds 5] [--batch-size 256]
       [--backend auto]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_train_memory import ensure_cache
from qks_pipeline.stage_two.loader import CacheLoader, open_loader
from qks_pipeline.store.features import open_cache


def drop_pages(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_pass(files: list[Path]) -> None:
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def images(loader: CacheLoader, epoch: int) -> int:
    return sum(len(batch.rows) for batch in loader.epoch(epoch))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=1.0, help="store size on disk, GiB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qks_bench_loader"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--backend", default="auto", choices=["auto", "direct", "tensorstore", "zarr"])
    args = ap.parse_args()
    store = args.dir / f"train_{args.gb:g}gb.zarr"
    ensure_cache(store, args.gb)
    cache = open_cache(store)
    files = [
        f
        for f in sorted((store / "tokens" / "c").rglob("*"), key=lambda p: p.parts[-4:])
        if f.is_file()
    ]
    n = cache.num_images
    kw = {"batch_size": args.batch_size, "columns": slice(0, cache.num_seen)}
    kw["backend"] = args.backend
    # used for every round
    in_order = open_loader(cache, shuffle=False, **kw)
    shuffled = open_loader(cache, **kw)
    passes = {
        "raw sequential read": lambda r: raw_pass(files) or n,
        "loader, in order": lambda r: images(in_order, r),
        "loader, shuffled": lambda r: images(shuffled, r),
        # checks every chunk's crc32c
        "shuffled, first epoch": lambda r: images(open_loader(cache, **kw), r),
    }
    seconds = {(name, cold): [] for cold in (False, True) for name in passes}  # per round
    # CPU seconds of the process (all threads): robust to the machine's load
    cpu = {key: [] for key in seconds}
    load = os.getloadavg()[0]
    print(
        f"{store}: {n} images, {len(files)} shard files, batch {args.batch_size}, {args.backend}, "
        f"load {load:.1f}"
    )
    for r in range(args.rounds):
        raw_pass(files)  # warm
        for name, cold in seconds:
            if cold:
                drop_pages(files)
            start, start_cpu = time.perf_counter(), time.process_time()
            count = passes[name](r)
            seconds[name, cold].append(time.perf_counter() - start)
            cpu[name, cold].append(time.process_time() - start_cpu)
            assert count == n, (name, count, n)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n / t[-1]:,.0f}" for t in seconds.values())
            + " images/s",
            flush=True,
        )
    for (name, cold), took in seconds.items():
        rate = n / np.median(took)
        raw = np.array(seconds["raw sequential read", cold])
        # each round's pass against the same round's raw read
        ratio = np.median(raw / np.array(took))
        gib = rate * cache.tokens.nbytes / n / 2**30
        ms = 1e6 * np.median(cpu[name, cold]) / n  # CPU ms per 1,000 images
        print(
            f"{'cold' if cold else 'warm'} {name:>20}: {rate:8,.0f} images/s ({gib:.2f} GiB/s), "
            f"{ratio:.2f} of raw; CPU {ms:.0f} ms per 1,000 images"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
