"""Peak RSS of the training loader over a cache larger than its buffer: the memory bound holds whatever the cache size.

Writes a synthetic ViT-B/16-sized cache (T=197, D=768, float16; about 0.3 MB per image) of `--gb` gigabytes once
(reused when present), then, in a fresh process so that writing does not count, iterates one shuffled training epoch
with the real loader and reports the peak resident set size against `CacheLoader.memory_bound_bytes` and the cache
size. Page cache (the OS caching the store's file) is not RSS and is not counted.

Usage: .venv/bin/python benchmarks/bench_train_memory.py [--gb 2] [--dir /tmp/qks_bench_memory] [--backend auto]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qks_pipeline.cache import create_cache, make_fingerprint, open_cache, size_on_disk

T, D, E, C = 197, 768, 512, 1006
SHARD = 1024


def write_cache(path: Path, gb: float) -> None:
    n = int(gb * 2**30 / (T * D * 2))
    rng = np.random.default_rng(0)
    cache = create_cache(
        path, fingerprint=make_fingerprint({"model": "synthetic"}), token_shape=(T, D), num_views=1, shard_size=SHARD,
        label_names=[f"l{i}" for i in range(C)], num_seen=925, labels=rng.choice([-1, 1], (n, C)).astype(np.int8),
        paths=[f"{i}.jpg" for i in range(n)], manifest_index=np.arange(n), visual_proj=np.zeros((D, E), np.float32),
    )  # fmt: skip
    base = rng.standard_normal((SHARD, 1, T, D), dtype=np.float32).astype(np.float16)  # (S, 1, T, D)
    for shard in range(cache.num_shards):
        rows = cache.shard_rows(shard)
        tokens = base[: rows.stop - rows.start] + np.float16(shard)  # distinct content per shard, no big RNG cost
        cache.write_shard(shard, tokens, np.ones(rows.stop - rows.start, bool), [])


def rss_mib() -> float:
    """Current resident set size (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def iterate(path: Path, batch_size: int, backend: str, buffer_blocks: int, prefetch: int) -> None:
    from qks_pipeline.loader import open_loader  # imports torch: counted in the RSS before the epoch

    cache = open_cache(path)
    loader = open_loader(cache, batch_size=batch_size, columns=slice(0, cache.num_seen), backend=backend,
                         buffer_blocks=buffer_blocks, prefetch=prefetch)  # fmt: skip
    before = rss_mib()
    start, n, checksum = time.perf_counter(), 0, 0.0
    for batch in loader.epoch(0):
        n += len(batch.rows)
        checksum += float(batch.tokens[:, 0, 0].float().sum())  # touch the data
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert n == loader.num_samples
    print(f"backend {backend}: {n} images in {seconds:.1f} s ({n / seconds:.0f} images/s, "
          f"{n * T * D * 2 / seconds / 2**30:.2f} GiB/s)")  # fmt: skip
    bound = loader.memory_bound_bytes / 2**20
    print(
        f"cache on disk {size_on_disk(path) / 2**30:.2f} GiB; loader bound {bound:.0f} MiB (buffer "
        f"{loader.buffer_blocks} + prefetch {loader.prefetch} + 4 blocks of {loader.block_size} rows + 2 batches)"
    )
    print(f"RSS before the epoch {before:.0f} MiB, peak {peak:.0f} MiB: growth {peak - before:.0f} MiB "
          f"(bound {bound:.0f} MiB)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="cache size on disk, GiB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qks_bench_memory"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backend", default="auto", choices=["auto", "zarr", "tensorstore"])
    ap.add_argument("--buffer-blocks", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--iterate", action="store_true", help=argparse.SUPPRESS)  # the measuring child process
    args = ap.parse_args()
    store = args.dir / f"train_{args.gb:g}gb.zarr"
    if args.iterate:
        iterate(store, args.batch_size, args.backend, args.buffer_blocks, args.prefetch)
        return
    if not (store / "zarr.json").exists() or not open_cache(store).is_complete():
        start = time.perf_counter()
        args.dir.mkdir(parents=True, exist_ok=True)
        write_cache(store, args.gb)
        print(f"wrote {store} in {time.perf_counter() - start:.0f} s")
    child = [sys.executable, __file__, "--iterate", "--gb", str(args.gb), "--dir", str(args.dir),
             "--batch-size", str(args.batch_size), "--backend", args.backend, "--buffer-blocks",
             str(args.buffer_blocks), "--prefetch", str(args.prefetch)]  # fmt: skip
    subprocess.run(child, check=True)


if __name__ == "__main__":
    main()
