"""Training throughput from the feature cache vs in-memory tensors, and vs the reference's
end-to-end way.

Same run, same model (ViT-B/16 sizes: T=197, D=768, E=512; 12 queries, 7 layers), same step
(`train.train_step`):

1. cache-fed: steps on the batches of the real loader over a synthetic Zarr cache (random rows
   read from the shard files, prefetch thread), timed from asking for the batch to the end of the
   step;
2. in-memory: the same steps on batches indexed out of tensors already in RAM (the upper bound for
   any loader), interleaved step by step with (1) so that both see the same load on this shared
   machine;
3. end-to-end (what the reference does every step): JPEG decode + CLIP preprocessing + CLIP
   ViT-B/16 forward (random weights, open_clip `ViT-B-16`, pretrained=None) + the head step;
   augmentation (RandAugment, cutout) is left out, so this is a lower bound on the reference's
   cost.

Usage: .venv/bin/python -m benchmarks.bench_train [--images 256] [--batch-size 16] [--rounds 2]
       [--threads N]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qks_pipeline.config import Params, TrainConfig
from qks_pipeline.stage_two.inputs import open_inputs
from qks_pipeline.stage_two.train import Session, make_session, train_step
from qks_pipeline.store.synthetic import make_synthetic

NUS_WIDE_TRAIN = 161_789  # images in NUS-WIDE's training list, for the per-epoch projection


def interleaved_epoch(
    s: Session, tokens: torch.Tensor, labels: torch.Tensor, epoch: int
) -> tuple[float, float]:
    """One epoch of the cache loader, each of its steps followed by the same-sized step on a random
    in-memory batch.

    Interleaving step by step puts both under the same machine load (this machine is shared, and its
    load swings). A cache-fed step is timed from asking the loader for the batch to the end of the
    step, so it includes any wait for data. Returns (cache-fed, in-memory) samples/s.
    """
    emb_seen = s.emb[: s.num_seen]
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(epoch))
    s.model.train()
    batches = iter(s.train_loader.epoch(epoch))
    # seconds of cache-fed and of in-memory steps, samples so far
    cache_s = 0.0
    memory_s = 0.0
    n = 0
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        train_step(s, batch.tokens, batch.labels, emb_seen)
        middle = time.perf_counter()
        idx = order[n : n + len(batch.rows)]
        train_step(s, tokens[idx], labels[idx], emb_seen)
        memory_s += time.perf_counter() - middle
        cache_s += middle - start
        n += len(batch.rows)
    return n / cache_s, n / memory_s


def jpeg_bytes(rng: np.random.Generator, n: int) -> list[bytes]:
    """Photo-like 500x375 JPEGs (smooth low-frequency content plus mild noise, quality 90)."""
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        arr = np.clip(
            np.asarray(img, np.int16) + rng.integers(-12, 13, (375, 500, 3)), 0, 255
        ).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def end_to_end(
    s: Session, tokens: torch.Tensor, labels: torch.Tensor, batches: int, batch: int
) -> dict[str, float]:
    """Seconds per sample of the reference's per-step work, each batch followed by a head step on
    in-memory tokens.

    Per batch: decode + preprocess `batch` JPEGs, CLIP ViT-B/16 visual forward (stage one's
    `visual_tokens`), then the head's train step on `batch` cached samples, all interleaved so that
    they see the same machine load.
    """
    from qks_pipeline.stage_one.backbone import load_backbone, visual_tokens

    loaded = load_backbone("ViT-B-16", "none")
    clip = loaded.model
    preprocess = loaded.preprocess
    jpegs = jpeg_bytes(np.random.default_rng(0), batch)
    visual_tokens(
        clip, torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs[:2]])
    )
    emb_seen = s.emb[: s.num_seen]
    cost = {"decode": 0.0, "clip": 0.0, "head": 0.0}
    for i in range(batches):
        t0 = time.perf_counter()
        images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
        t1 = time.perf_counter()
        assert visual_tokens(clip, images).shape[1:] == (197, 768)
        t2 = time.perf_counter()
        idx = torch.arange(i * batch, (i + 1) * batch) % len(tokens)
        train_step(s, tokens[idx], labels[idx], emb_seen)
        t3 = time.perf_counter()
        cost["decode"] += t1 - t0
        cost["clip"] += t2 - t1
        cost["head"] += t3 - t2
    return {k: v / (batches * batch) for k, v in cost.items()}


def setup(root: Path, images: int, batch_size: int) -> tuple[Session, torch.Tensor, torch.Tensor]:
    """A synthetic ViT-B/16-sized cache (925 seen + 81 unseen labels, as NUS-WIDE), a default-sized
    session on it, and the same tokens and labels loaded into RAM."""
    sizes = {
        "num_seen": 925,
        "num_unseen": 81,
        "num_tokens": 197,
        "dim": 768,
        "embed_dim": 512,
        "shard_size": 1024,
    }
    data = make_synthetic(root, num_train=images, num_test=8, noise=1.0, **sizes)
    inputs = open_inputs(data.train, data.labels)
    s = make_session(
        Params(train=TrainConfig(batch_size=batch_size, val_fraction=0.0)),
        inputs,
        torch.device("cpu"),
    )
    tokens = torch.from_numpy(inputs.cache.tokens[:, 0])  # (N, T, D) float16, in RAM
    labels = torch.from_numpy(inputs.cache.labels[:, : inputs.num_seen])  # (N, C_seen)
    bound = s.train_loader.memory_bound_bytes / 2**20
    mib = tokens.numel() * 2 / 2**20
    print(
        f"cache: {images} images x 197 x 768 float16 ({mib:.0f} MiB), batch {batch_size}, "
        "12 queries x 7 layers"
    )
    print(f"loader: {type(s.train_loader.reader).__name__}, memory bound {bound:.0f} MiB")
    train_step(s, tokens[:4], labels[:4], s.emb[: s.num_seen])  # warm-up
    return s, tokens, labels


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--images", type=int, default=256, help="training images in the synthetic cache"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--rounds", type=int, default=2, help="epochs, each step-interleaved (cache, in-memory)"
    )
    ap.add_argument(
        "--e2e-batches", type=int, default=4, help="batches of the end-to-end measurement"
    )
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        s, tokens, labels = setup(Path(tmp), args.images, args.batch_size)
        rates = [interleaved_epoch(s, tokens, labels, r) for r in range(args.rounds)]
        for r, (c, m) in enumerate(rates):
            print(
                f"epoch {r + 1}: cache-fed {c:.2f} samples/s, in-memory {m:.2f} samples/s, "
                f"ratio {c / m:.3f}"
            )
    cac = len(rates) / sum(1 / c for c, _ in rates)  # total samples / total time
    mem = len(rates) / sum(1 / m for _, m in rates)
    ratio = f"ratio {cac / mem:.3f} (target >= 0.95)"
    print(
        f"training, all epochs: from the cache {cac:.2f} samples/s, in-memory {mem:.2f}; {ratio}\n"
    )
    e2e = end_to_end(s, tokens, labels, args.e2e_batches, args.batch_size)
    cached = e2e["head"] * mem / cac  # the head step plus the loader's measured overhead
    total = e2e["decode"] + e2e["clip"] + e2e["head"]
    ms = {k: f"{1e3 * v:.1f} ms" for k, v in e2e.items()}
    print(
        f"per sample: decode+preprocess {ms['decode']}, CLIP ViT-B/16 forward {ms['clip']}, "
        f"head step {ms['head']}"
    )
    n = int(NUS_WIDE_TRAIN * 0.9)
    hours = n / 3600
    per_epoch = (
        f"from the cache {args.images * cached:.1f} s, end-to-end {args.images * total:.1f} s"
    )
    print(
        f"per epoch of {args.images} images: {per_epoch}; "
        f"end-to-end / cache = {total / cached:.2f}x"
    )
    print(
        f"NUS-WIDE epoch ({n} images) here: from the cache {hours * cached:.1f} h, "
        f"end-to-end {hours * total:.1f} h"
    )


if __name__ == "__main__":
    main()
