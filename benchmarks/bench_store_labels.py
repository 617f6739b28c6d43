"""Peak memory of a store's label matrix at Open Images' vocabulary: whole vs one shard at a time.

`create_cache` takes the (N, C) int8 label matrix either whole or as a function of (start, stop)
that stage one calls one shard at a time. This builds N synthetic manifest records over C labels (8
positives and 8 verified negatives each, as Open Images' human labels), then creates a store
(ViT-B/16 token shape; no tokens are written) both ways, each in a fresh process, and prints the
peak resident set size of each against the memory of the records alone.

    .venv/bin/python -m benchmarks.bench_store_labels [--images 300000] [--labels 7586]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from qks_pipeline.data.manifest import Record, label_matrix
from qks_pipeline.store.features import create_cache

SHARD = 1024


def records(n: int, c: int) -> tuple[list[Record], list[str]]:
    names = [f"label{j}" for j in range(c)]
    rng = np.random.default_rng(0)
    # 8 positive, 8 negative
    picked = [[names[j] for j in p] for p in rng.integers(0, c, size=(n, 16))]
    return [Record(f"img/{i}.jpg", tuple(p[:8]), tuple(p[8:])) for i, p in enumerate(picked)], names


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(mode: str, n: int, c: int, out: Path) -> None:
    recs, names = records(n, c)
    before = peak_mib()
    if mode == "whole":
        labels = label_matrix(recs, names)
    else:

        def labels(start: int, stop: int) -> np.ndarray:
            return label_matrix(recs[start:stop], names)

    create_cache(
        out,
        fingerprint={"format_version": 1},
        token_shape=(197, 768),
        num_views=1,
        shard_size=SHARD,
        label_names=names,
        num_seen=c,
        labels=labels,
        paths=[r.image for r in recs],
        manifest_index=np.arange(n),
        visual_proj=np.zeros((768, 512), np.float32),
    )
    print(
        f"{mode}: records {before:.0f} MiB, peak {peak_mib():.0f} MiB, "
        f"growth {peak_mib() - before:.0f} MiB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300_000)
    p.add_argument("--labels", type=int, default=7586)
    # a child process's part
    p.add_argument("--mode", choices=["whole", "shards"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        run(args.mode, args.images, args.labels, args.out)
        return
    n, c = args.images, args.labels
    print(f"{n} images x {c} labels: the whole int8 matrix is {n * c / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("whole", "shards"):
            argv = [
                sys.executable,
                __file__,
                "--images",
                str(n),
                "--labels",
                str(c),
                "--mode",
                mode,
            ]
            subprocess.run([*argv, "--out", str(Path(tmp) / f"{mode}.zarr")], check=True)


if __name__ == "__main__":
    main()
