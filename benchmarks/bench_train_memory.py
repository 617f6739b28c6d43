"""Peak RSS of the training loader over a cache far larger than its buffers: the bound holds
whatever the cache size.

Writes a synthetic ViT-B/16-sized cache (T=197, D=768, float16; about 0.3 MB per image) of `--gb`
gigabytes once (reused when present), then, in a fresh process so that writing does not count,
iterates one shuffled training epoch with the real loader and reports the peak resident set size
against `CacheLoader.memory_bound_bytes` and the cache size. Page cache (the OS caching the store's
file) is not RSS and is not counted.

Usage: .venv/bin/python -m benchmarks.bench_train_memory [--gb 2] [--dir /tmp/qks_bench_memory]
       [--backend auto] [--batch-size 64] [--prefetch 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qks_pipeline.store.features import create_cache, open_cache, size_on_disk
from qks_pipeline.store.fingerprint import FORMAT_VERSION, make_fingerprint

T, D, E, C = 197, 768, 512, 1006
SHARD = 1024


def write_cache(path: Path, gb: float) -> None:
    n = int(gb * 2**30 / (T * D * 2))
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 1], (n, C)).astype(np.int8)
    kw = {"paths": [f"{i}.jpg" for i in range(n)], "manifest_index": np.arange(n), "labels": labels}
    cache = create_cache(
        path,
        fingerprint=make_fingerprint({"model": "synthetic"}),
        token_shape=(T, D),
        num_views=1,
        shard_size=SHARD,
        label_names=[f"l{i}" for i in range(C)],
        num_seen=925,
        visual_proj=np.zeros((D, E), np.float32),
        **kw,
    )
    # (S, 1, T, D)
    base = rng.standard_normal((SHARD, 1, T, D), dtype=np.float32).astype(np.float16)
    for shard in range(cache.num_shards):
        rows = cache.shard_rows(shard)
        # distinct content per shard, no big RNG cost
        tokens = base[: rows.stop - rows.start] + np.float16(shard)
        cache.write_shard(shard, tokens, np.ones(rows.stop - rows.start, bool), [])


def ensure_cache(path: Path, gb: float) -> None:
    """`write_cache` unless an earlier run left a complete store of this format at `path`."""
    if (path / "zarr.json").exists():
        cache = open_cache(path)
        current = cache.fingerprint["format_version"] == FORMAT_VERSION
        if current and len(cache.done_shards()) == cache.num_shards:
            return
        # an older format's store: rebuilt, as readers refuse what its layout may leave out
        shutil.rmtree(path)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cache(path, gb)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


def rss_mib(key: str = "VmRSS") -> float:
    """Resident set size now (VmRSS) or its peak (VmHWM), from Linux /proc. Not `getrusage`: its
    peak survives `execve`, so a child started by a parent that wrote the cache would report the
    parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def iterate(path: Path, batch_size: int, backend: str, prefetch: int) -> None:
    # imports torch: counted in the RSS before the epoch
    from qks_pipeline.stage_two.loader import open_loader

    cache = open_cache(path)
    kw = {"columns": slice(0, cache.num_seen), "backend": backend, "prefetch": prefetch}
    loader = open_loader(cache, batch_size=batch_size, **kw)
    before = rss_mib()
    start = time.perf_counter()
    n = 0
    checksum = 0.0
    for batch in loader.epoch(0):
        n += len(batch.rows)
        checksum += float(batch.tokens[:, 0, 0].float().sum())  # touch the data
    seconds = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    assert n == loader.num_samples
    rate = f"{n / seconds:.0f} images/s, {n * T * D * 2 / seconds / 2**30:.2f} GiB/s"
    print(
        f"backend {backend} ({type(loader.reader).__name__}): "
        f"{n} images in {seconds:.1f} s ({rate})"
    )
    bound = loader.memory_bound_bytes / 2**20
    print(
        f"cache on disk {size_on_disk(path) / 2**30:.2f} GiB; loader bound {bound:.0f} MiB "
        f"((prefetch {prefetch} + 2) batches of {batch_size} "
        "+ the labels of 2 windows of shards + 32 MiB)"
    )
    print(
        f"RSS before the epoch {before:.0f} MiB, peak {peak:.0f} MiB: "
        f"growth {peak - before:.0f} MiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=2.0, help="cache size on disk, GiB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qks_bench_memory"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backend", default="auto", choices=["auto", "direct", "zarr", "tensorstore"])
    ap.add_argument("--prefetch", type=int, default=2)
    # the measuring child process
    ap.add_argument("--iterate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    store = args.dir / f"train_{args.gb:g}gb.zarr"
    if args.iterate:
        iterate(store, args.batch_size, args.backend, args.prefetch)
        return
    ensure_cache(store, args.gb)
    child = [
        "--iterate",
        "--gb",
        str(args.gb),
        "--dir",
        str(args.dir),
        "--batch-size",
        str(args.batch_size),
    ]
    child += ["--backend", args.backend, "--prefetch", str(args.prefetch)]
    subprocess.run([sys.executable, __file__, *child], check=True)


if __name__ == "__main__":
    main()
