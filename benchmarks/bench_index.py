"""The query index (issue 23): what building it costs against `qks evaluate`'s head pass, and what
tagging, searching and evaluating from it cost. Each ratio is measured side by side in one run.

1. Build: `build_index` images/s vs the scoring pass of `qks evaluate` (`score_rows` with the
   head, as `evaluate` runs it) over the same feature store, same batch size (one head pass each:
   the ratio should be >= 0.9).
2. Evaluate: `evaluate_index` vs `evaluate` (checkpoint + cache) on that store with C labels: time
   ratio, and the largest difference over every metric, z in fp16 and fp32.
3. Tag: `Index.tag` of N images x 1,000 labels (z 12 x 512 fp16, the default head at ViT-B/16
   widths; every prediction built as `qks tag` writes it) vs a bare `torch.matmul` + `amax` of the
   same shapes in the same process; peak RSS in a fresh process, after 20% of the images and at
   the end (flat: the score matrix is never held).
4. Search: one label over M synthetic index rows, in a fresh process: seconds and peak RSS.

Feature stores, heads and indexes are synthetic (random tokens, random heads, random z): only
sizes matter here. The defaults take a few minutes on 2 cores; `--full` runs the issue's sizes
(ViT-B/16 tokens and the 7-layer head for the build, 100,000 images for tagging, 1,000,000 rows
of 12 x 512 for search: a 12 GB index), which takes much longer.

Usage: .venv/bin/python -m benchmarks.bench_index [--full] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qks_pipeline.config import EvaluateConfig, IndexConfig, ModelConfig
from qks_pipeline.index.build import build_index
from qks_pipeline.index.evaluation import evaluate_index
from qks_pipeline.index.index import Index
from qks_pipeline.index.store import create_index, index_fingerprint
from qks_pipeline.stage_two.checkpoint import load as load_checkpoint
from qks_pipeline.stage_two.checkpoint import make_config, save_weights, write_config
from qks_pipeline.stage_two.evaluate import evaluate
from qks_pipeline.stage_two.loader import open_loader
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.stage_two.scoring import model_scorer, score_rows
from qks_pipeline.store.features import Cache, create_cache
from qks_pipeline.store.fingerprint import make_fingerprint
from qks_pipeline.store.label_store import write_label_embeddings

BACKBONE = {"model": "bench", "pretrained": "none"}
QUIET = {"device": "cpu", "echo": lambda _: None}
# (images, tokens, width, layers, feed-forward) of the build and evaluation store and head
BUILD = {"default": (2048, 50, 384, 2, 1536), "full": (1024, 197, 768, 7, 3072)}
ROUNDS = 3  # the build and evaluate's head pass alternate; the best round of each counts
# the synthetic labels' logits sit about this far below 0, so that a few of 1,000 labels score
# above 0.5 on an image, as a tagger's do (random ones would put half of them above)
BIAS = -4.0
TAG_IMAGES = {"default": 20_000, "full": 100_000}
# (rows, queries, embedding width) of the search index
SEARCH = {"default": (1_000_000, 12, 32), "full": (1_000_000, 12, 512)}
QUERIES = 12
EMBED = 512
LABELS = 1_000
SEEN = 925


def status_mib(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) / 1024


def feature_store(path: Path, n: int, t: int, d: int, c: int, rng: np.random.Generator) -> Cache:
    """A complete test store of random tokens (n, 1, t, d) and random labels (~5 positives, ~10
    negatives an image); with t = 0 an empty store whose rows are only marked valid."""

    def labels(start: int, stop: int) -> np.ndarray:
        r = np.random.default_rng(start).random((stop - start, c), dtype=np.float32)
        return np.where(r < 5 / c, 1, np.where(r < 15 / c, -1, 0)).astype(np.int8)

    cache = create_cache(
        path,
        fingerprint=make_fingerprint(BACKBONE, {"split": "test"}),
        token_shape=(max(t, 1), d),
        num_views=1,
        shard_size=1024,
        label_names=[f"l{i}" for i in range(c)],
        num_seen=min(SEEN, c),
        labels=labels,
        paths=[f"{i:07d}.jpg" for i in range(n)],
        manifest_index=np.arange(n),
        visual_proj=np.eye(d, EMBED, dtype=np.float32),
    )
    for shard in range(cache.num_shards):
        rows = cache.shard_rows(shard)
        size = rows.stop - rows.start
        if t:
            tokens = rng.standard_normal((size, 1, t, d), dtype=np.float32)
            cache.write_shard(shard, tokens, np.ones(size, bool), [])
    if not t:
        cache.valid[:] = True
    return cache


def checkpoint(path: Path, t: int, d: int, layers: int, ff: int, names: list[str]) -> Path:
    """A random head (12 queries) saved as a `qks train` directory."""
    torch.manual_seed(0)
    head = QKS(ModelConfig(num_queries=QUERIES, num_layers=layers, ff_dim=ff), d, EMBED)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(head, path / "best.safetensors")
    how = {"selection": "val", "selection_note": "", "label_names": names, "num_seen": SEEN}
    write_config(path, make_config(head, t, BACKBONE, None, **how))
    return path


def bench_build(root: Path, size: str) -> dict:
    """Figures 1 and 2: build vs evaluate's head pass; evaluate from the index vs the cache."""
    n, t, d, layers, ff = BUILD[size]
    rng = np.random.default_rng(0)
    store = feature_store(root / "test.zarr", n, t, d, LABELS, rng)
    names = store.label_names
    emb = rng.standard_normal((LABELS, EMBED)).astype(np.float32)
    labels = root / "labels.zarr"
    write_label_embeddings(labels, names, emb, make_fingerprint(BACKBONE), num_seen=SEEN)
    ckpt = checkpoint(root / "ckpt", t, d, layers, ff, names)
    batch = IndexConfig().batch_size
    model, _ = load_checkpoint(ckpt, torch.device("cpu"))
    scorer = model_scorer(model, torch.from_numpy(emb), query_index=True)
    head_s = []
    built = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        score_rows(scorer, open_loader(store, batch_size=batch, shuffle=False), "cpu", QUERIES)
        head_s.append(time.perf_counter() - start)
        fp16 = build_index(ckpt, store.path, root / "fp16.zarr", overwrite=True)
        built.append(fp16.seconds)
    fp32 = IndexConfig(precision="fp32")
    build_index(ckpt, store.path, root / "fp32.zarr", params=fp32)
    params = EvaluateConfig(batch_size=batch)
    start = time.perf_counter()
    expected = evaluate(
        store.path, labels, root / "cache.json", checkpoint=ckpt, params=params, **QUIET
    )
    cache_s = time.perf_counter() - start
    out = {"images": n, "tokens": t, "width": d, "layers": layers}
    out |= {"head_images_s": n / min(head_s), "build_images_s": n / min(built)}
    for precision in ("fp16", "fp32"):
        start = time.perf_counter()
        got = evaluate_index(
            root / f"{precision}.zarr", labels, root / f"{precision}.json", params=params, **QUIET
        )
        out[f"evaluate_{precision}_s"] = time.perf_counter() - start
        out[f"max_diff_{precision}"] = max(
            abs(got[s][k] - v)
            for s in ("zsl", "gzsl", "seen")
            for k, v in expected[s].items()
            if isinstance(v, float) and v == v
        )
    out["evaluate_cache_s"] = cache_s
    return out


def synthetic_index(path: Path, n: int, q: int, e: int, rng: np.random.Generator) -> Path:
    """An index of n rows of random z (q, e), fp16, over a token-less store of n valid rows; the
    first dimension of every z is 1 (the mean it is centred on), the others N(0, 1)."""
    store = feature_store(path.with_suffix(".store.zarr"), n, 0, 8, 1, rng)
    fingerprint = index_fingerprint({"weights_sha256": "bench"}, store.fingerprint, "fp16")
    mean = np.zeros((q, e), np.float32)
    mean[:, 0] = 1
    index = create_index(
        path,
        store,
        fingerprint=fingerprint,
        z_mean=mean,
        checkpoint_dir=path,
        checkpoint_config={},
    )
    for shard in range(index.num_shards):
        rows = index.shard_rows(shard)
        z = rng.standard_normal((rows.stop - rows.start, q, e), dtype=np.float32)
        z[:, :, 0] = 1
        index.write_shard(shard, z)
    return path


def label_embeddings(c: int, e: int) -> np.ndarray:
    """(c, e) label embeddings for `synthetic_index`: z . e_c ~ BIAS + N(0, 1)."""
    emb = np.random.default_rng(1).standard_normal((c, e)) / np.sqrt(e - 1)
    emb[:, 0] = BIAS
    return emb.astype(np.float32)


def child(what: str, path: Path, labels: int, threads: int) -> None:
    """In a fresh process: tag or search `path` with random label embeddings; print JSON."""
    torch.set_num_threads(threads)
    index = Index.open(path, device="cpu")
    emb = label_embeddings(labels, index.store.embed_dim)
    names = [f"label {i}" for i in range(labels)]
    before = status_mib("VmRSS")
    start = time.perf_counter()
    out: dict = {}
    if what == "search":
        index.search(names, top=10, embeddings=emb)
    else:
        for i, _ in enumerate(index.tag(names, top_k=5, threshold=0.5, embeddings=emb), 1):
            if i == index.num_images // 5:
                out["peak_at_20%_mib"] = status_mib("VmHWM")
    out |= {"seconds": time.perf_counter() - start, "rss_before_mib": before}
    print(json.dumps(out | {"peak_mib": status_mib("VmHWM")}))


def run_child(what: str, path: Path, labels: int, threads: int = 2) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_index", "--child", what, str(path), str(labels)]
    cmd.append(str(threads))
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bare_matmul(n: int, q: int, e: int, c: int, block: int) -> float:
    """Seconds of torch.matmul + amax over n rows of (q, e) against c labels, in blocks of `block`
    rows (z already float32 in memory)."""
    z = torch.randn(block, q, e)
    emb = torch.randn(c, e)
    start = time.perf_counter()
    for begin in range(0, n, block):
        torch.matmul(z[: min(block, n - begin)], emb.T).amax(dim=1)  # (b, q, c) -> (b, c)
    return time.perf_counter() - start


def bench_tag(root: Path, size: str) -> dict:
    n = TAG_IMAGES[size]
    path = synthetic_index(root / "tag.zarr", n, QUERIES, EMBED, np.random.default_rng(2))
    from qks_pipeline.index.store import BLOCK_ENTRIES

    block = max(1, BLOCK_ENTRIES // (QUERIES * LABELS))
    bare = bare_matmul(n, QUERIES, EMBED, LABELS, block)
    tagged = run_child("tag", path, LABELS)
    return {"images": n, "bare_s": bare, **tagged, "ratio": bare / tagged["seconds"]}


def bench_search(root: Path, size: str) -> dict:
    rows, q, e = SEARCH[size]
    path = synthetic_index(root / "search.zarr", rows, q, e, np.random.default_rng(3))
    out = {"rows": rows, "queries": q, "width": e, **run_child("search", path, 1)}
    return out | {"one_thread_s": run_child("search", path, 1, threads=1)["seconds"]}


def report(build: dict, tag: dict, search: dict) -> None:
    """Print the four figures."""
    b = build
    shape = (
        f"{b['images']} images of {b['tokens']} x {b['width']}, 12 queries x {b['layers']} layers"
    )
    ratio = b["build_images_s"] / b["head_images_s"]
    print(f"1. build ({shape}): {b['build_images_s']:.1f} images/s", end=" ")
    print(f"vs evaluate's head pass {b['head_images_s']:.1f}: ratio {ratio:.2f}")
    speedup = b["evaluate_cache_s"] / b["evaluate_fp16_s"]
    print(f"2. evaluate, {LABELS:,} labels: from the cache {b['evaluate_cache_s']:.2f} s,", end=" ")
    print(f"from the index fp16 {b['evaluate_fp16_s']:.2f} s ({speedup:.1f}x),", end=" ")
    print(f"fp32 {b['evaluate_fp32_s']:.2f} s; largest metric difference", end=" ")
    print(f"fp16 {b['max_diff_fp16']:.1e}, fp32 {b['max_diff_fp32']:.1e}")
    speed = tag["images"] / tag["seconds"]
    print(f"3. tag {tag['images']:,} images x {LABELS:,} labels (z 12 x 512 fp16):", end=" ")
    print(f"{tag['seconds']:.1f} s ({speed:,.0f} images/s); bare matmul + amax", end=" ")
    print(f"{tag['bare_s']:.1f} s: ratio {tag['ratio']:.2f}; peak RSS", end=" ")
    print(
        f"{tag['peak_at_20%_mib']:.0f} MiB after 20% of the images, {tag['peak_mib']:.0f}", end=" "
    )
    print(f"MiB at the end ({tag['rss_before_mib']:.0f} before tagging)")
    s = search
    print(
        f"4. search one label over {s['rows']:,} rows of {s['queries']} x {s['width']} fp16:",
        end=" ",
    )
    gb_s = s["rows"] * s["queries"] * s["width"] * 2 / s["seconds"] / 1e9
    print(f"{s['seconds']:.2f} s ({gb_s:.2f} GB/s of z); peak RSS {s['peak_mib']:.0f} MiB", end=" ")
    print(f"({s['rss_before_mib']:.0f} before); with one torch thread {s['one_thread_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full", action="store_true", help="the issue's sizes (long; 14 GB of disk)"
    )
    parser.add_argument("--keep", type=Path, help="work here and keep the stores")
    parser.add_argument(
        "--child", nargs=4, metavar=("WHAT", "INDEX", "LABELS", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]), int(args.child[3]))
        return
    size = "full" if args.full else "default"
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        root = Path(tmp)
        build = bench_build(root, size)
        tag = bench_tag(root, size)
        search = bench_search(root, size)
    print(f"torch threads {torch.get_num_threads()}")
    report(build, tag, search)


if __name__ == "__main__":
    main()
