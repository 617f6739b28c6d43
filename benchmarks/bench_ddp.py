"""Data-parallel training throughput: samples/s with 1, 2, ... ranks (`train.nproc`), efficiency.

Each run is a real `qks_pipeline.stage_two.train.train` over one synthetic cache (the global batch
fixed; each rank takes batch / N of it), timed by the training loop itself (`samples_per_s` of
train_log.csv: the epoch's samples over its wall time, validation excluded); the first epoch is left
out as warm-up. On the CPU every rank runs one thread (gloo); on CUDA each rank gets one GPU (NCCL),
so pass at most the GPU count.

Usage: .venv/bin/python -m benchmarks.bench_ddp [--nproc 1,2] [--device cpu] [--images 1024]
       [--tokens 50] [--dim 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

# before torch: every rank, and the single process, on one thread
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from qks_pipeline.config import EvaluateConfig, ModelConfig, Params, TrainConfig  # noqa: E402
from qks_pipeline.stage_two.train import train  # noqa: E402
from qks_pipeline.store.synthetic import make_synthetic  # noqa: E402


def quiet(_: str) -> None:
    """The ranks' echo: module level, so that the launcher can pickle it."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", default="1,2", help="comma-separated rank counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ModelConfig(
        num_queries=args.queries, num_layers=args.layers, num_heads=8, ff_dim=4 * args.dim
    )
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=1e-4, val_fraction=0.05, scheduler="none"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic(
            Path(tmp) / "data",
            num_train=args.images,
            num_test=32,
            num_tokens=args.tokens,
            dim=args.dim,
            embed_dim=args.dim // 2,
            shard_size=256,
        )
        rates = {}
        for n in map(int, args.nproc.split(",")):
            p = Params(
                model=model,
                train=dataclasses.replace(cfg, nproc=n),
                evaluate=EvaluateConfig(batch_size=256),
            )
            progress = train(
                data.train,
                data.labels,
                Path(tmp) / f"run{n}",
                params=p,
                device=args.device,
                progress_bar=False,
                echo=quiet,
            )
            timed = [row["samples_per_s"] for row in progress.log[1:]] or [
                progress.log[0]["samples_per_s"]
            ]
            rates[n] = sum(timed) / len(timed)
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({os.cpu_count()} cores)"
    )
    print(
        f"{device}; {args.images} images x {args.tokens} tokens x {args.dim}, "
        f"batch {args.batch_size}, {args.queries} queries, {args.layers} layers, "
        f"{args.epochs} epochs (first left out)"
    )
    base = rates[min(rates)] / min(rates)
    print(f"{'ranks':>5} {'samples/s':>10} {'speed-up':>9} {'efficiency':>10}")
    for n, rate in rates.items():
        print(f"{n:>5} {rate:>10.1f} {rate / rates[min(rates)]:>8.2f}x {rate / (base * n):>10.2f}")


if __name__ == "__main__":
    main()
