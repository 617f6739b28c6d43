"""The training loader against the disk: one epoch of the loader vs a raw sequential read of the same shard files.

Writes a synthetic ViT-B/16-sized store (197 x 768 float16 tokens, 1,024 images a shard, 1,006 labels; about 0.3 MB
an image) of `--gb` GiB through the project's own cache API (reused when present), then, `--rounds` times, one pass
each of: the raw read (`open` + `readinto` of every shard file in 16 MiB pieces, all bytes, index included), the
loader in store order (validation, evaluation) and the loader shuffled (training), each with the page cache warm and
cold (the shard files' pages dropped before the pass with `posix_fadvise(DONTNEED)`, which needs no root). Passes are
interleaved so that all see the same load on a shared machine; the ratios are over the summed times. The loader passes
are repeated without the crc32c check of each chunk, to measure its cost. No model: this is what the loader can deliver.

Usage: .venv/bin/python benchmarks/bench_loader.py [--gb 1] [--rounds 3] [--batch-size 256] [--backend auto]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench_train_memory import write_cache

from qks_pipeline.cache import Cache, open_cache
from qks_pipeline.loader import open_loader


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


def loader_pass(cache: Cache, epoch: int, verify: bool = True, **kw: Any) -> int:
    loader = open_loader(cache, **kw)
    loader.reader.verify = verify  # the direct reader's crc32c check of each chunk
    return sum(len(batch.rows) for batch in loader.epoch(epoch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="store size on disk, GiB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qks_bench_loader"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--backend", default="auto", choices=["auto", "direct", "tensorstore", "zarr"])
    args = ap.parse_args()
    store = args.dir / f"train_{args.gb:g}gb.zarr"
    if not (store / "zarr.json").exists() or not open_cache(store).is_complete():
        start = time.perf_counter()
        write_cache(store, args.gb)
        print(f"wrote {store} in {time.perf_counter() - start:.0f} s")
    cache = open_cache(store)
    files = [f for f in sorted((store / "tokens" / "c").rglob("*"), key=lambda p: p.parts[-4:]) if f.is_file()]
    n, kw = cache.num_images, {"batch_size": args.batch_size, "columns": slice(0, cache.num_seen)}
    kw["backend"] = args.backend
    passes = {
        "raw sequential read": lambda r: raw_pass(files) or n,
        "loader, in order": lambda r: loader_pass(cache, r, shuffle=False, **kw),
        "loader, shuffled": lambda r: loader_pass(cache, r, **kw),
        "in order, no crc32c": lambda r: loader_pass(cache, r, False, shuffle=False, **kw),
        "shuffled, no crc32c": lambda r: loader_pass(cache, r, False, **kw),
    }
    seconds = dict.fromkeys([(name, cold) for cold in (False, True) for name in passes], 0.0)
    load = os.getloadavg()[0]
    print(f"{store}: {n} images, {len(files)} shard files, batch {args.batch_size}, {args.backend}, load {load:.1f}")
    for r in range(args.rounds):
        raw_pass(files)  # warm
        for name, cold in seconds:
            if cold:
                drop_pages(files)
            start = time.perf_counter()
            assert run(r) == n if (run := passes[name]) else False
            seconds[name, cold] += time.perf_counter() - start
            print(
                f"round {r + 1} {'cold' if cold else 'warm'} {name}: {n / (time.perf_counter() - start):,.0f} images/s"
            )
    for name, cold in seconds:
        rate, raw = args.rounds * n / seconds[name, cold], seconds["raw sequential read", cold]
        gib = rate * cache.tokens.nbytes / n / 2**30
        ratio = raw / seconds[name, cold]
        print(f"{'cold' if cold else 'warm'} {name:>20}: {rate:8,.0f} images/s ({gib:.2f} GiB/s), {ratio:.2f} of raw")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
