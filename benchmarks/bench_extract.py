"""Extraction throughput: the full stage-one path against the same model's pure forward pass.

Both in the same run, on the same machine. Full path: JPEG files on disk -> DataLoader workers
(decode + CLIP preprocessing) -> forward -> float16 -> whole-shard Zarr writes and done markers
(`qks_pipeline.stage_one.extract.extract`). Pure forward: `visual_tokens` on preprocessed tensors
already in memory, same batch size. The ratio says how much of the forward pass's speed the input
path keeps.

The model has random weights (no pretrained weights can be downloaded here); speed does not depend
on the values. Forward-only and full runs alternate and the best of each is compared, so a machine
shared with other work biases neither side. The share of the full run's loop time spent inside the
forward pass is printed too: unlike the images/s figures it hardly depends on what else the machine
is doing.

    # ViT-B-16, 48 images of 500x375
    .venv/bin/python -m benchmarks.bench_extract
    .venv/bin/python -m benchmarks.bench_extract --model ViT-B-32 --images 96
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qks_pipeline.config import BackboneConfig, ExtractConfig
from qks_pipeline.stage_one.backbone import load_backbone, visual_tokens
from qks_pipeline.stage_one.extract import extract


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus mild noise: JPEG size and decode cost close to a real photo's."""
    low = Image.fromarray(rng.integers(0, 255, (height // 25, width // 25, 3), dtype=np.uint8))
    img = np.asarray(low.resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 12, img.shape, dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_dataset(root: Path, n: int, size: tuple[int, int]) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    dataset, images = root / "dataset", root / "images"
    dataset.mkdir()
    images.mkdir()
    lines = []
    for i in range(n):
        photo_like(rng, *size).save(images / f"{i:05d}.jpg", quality=90)
        lines.append(json.dumps({"image": f"{i:05d}.jpg", "positive": ["a"], "negative": ["b"]}))
    (dataset / "train.jsonl").write_text("\n".join(lines) + "\n")
    (dataset / "seen.txt").write_text("a\n")
    (dataset / "unseen.txt").write_text("b\n")
    return dataset, images


def pure_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """images/s of visual_tokens alone on in-memory preprocessed batches (after a warm-up batch)."""
    visual_tokens(model, batches[0])
    start = time.perf_counter()
    for x in batches:
        visual_tokens(model, x)
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument(
        "--repeats", type=int, default=2, help="full runs, each between two forward-only runs"
    )
    ap.add_argument(
        "--size", type=int, nargs=2, default=(500, 375), help="width height of the JPEGs on disk"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dataset, images = make_dataset(Path(tmp), args.images, tuple(args.size))
        loaded = load_backbone(args.model, "none")
        model, preprocess = loaded.model, loaded.preprocess
        tensors = [preprocess(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.jpg"))]
        batches = [
            torch.stack(tensors[i : i + args.batch_size])
            for i in range(0, len(tensors), args.batch_size)
        ]
        cfg = ExtractConfig(
            batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size
        )
        backbone = BackboneConfig(args.model, "none")
        # images/s of each pure forward pass and of each full run; the full runs' forward share
        forward = [pure_forward(model, batches)]
        full = []
        busy = []
        # forward, full, forward, full, ..., forward: both see the same drifting load
        for i in range(args.repeats):
            out = Path(tmp) / f"out{i}.zarr"
            result = extract(
                dataset, "train", images, out, backbone=backbone, cfg=cfg, device="cpu"
            )
            full.append(result.images_per_second)
            busy.append(result.forward_seconds / result.loop_seconds)
            forward.append(pure_forward(model, batches))
    print(
        f"model {args.model} (random weights), {args.images} JPEGs {args.size[0]}x{args.size[1]}, "
        f"batch {args.batch_size}, workers {args.workers}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"pure forward (in-memory tensors): {max(forward):8.2f} images/s (best of {_fmt(forward)})"
    )
    print(f"full extraction (files -> store): {max(full):8.2f} images/s (best of {_fmt(full)})")
    print(f"ratio full / forward (best runs): {max(full) / max(forward):8.3f}")
    print(
        f"share of the full runs' loop time inside the forward pass: {_fmt(busy)} "
        "(the rest: input waits, writes)"
    )


if __name__ == "__main__":
    main()
