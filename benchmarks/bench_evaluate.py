"""Peak memory and time of `qks evaluate` at Open Images' vocabulary (7,186 seen + 400 unseen
labels), and what float16 does to the ranking.

Memory: for each size, a synthetic test store (tiny tokens: the scores and labels are what grow with
N x C; the loader's token blocks are a constant, see loader.py) and a label store are written, then
a fresh process runs the real `evaluate` (the CLIP baseline as issue 14 measured it, or with
`--head` a tiny QKS head too; per-label CSV, standard protocol) and reports its peak RSS (VmHWM).
Printed: peak RSS, the RSS before evaluating (imports), bytes per (image, label) above it, time, the
linear fit over the sizes and its extrapolation to Open Images' 125,436 test images, beside the
figures issue 14 measured before this change.

Precision (`--precision`): a tiny random QKS head (ViT-B/16 widths, 12 queries, 2 layers) on random
tokens scaled like CLIP's, C labels: logits from float32 tokens vs float16-rounded tokens (what the
cache stores), and from float32 vs float16 arithmetic (what autocast did to scoring), as the largest
logit change relative to the largest logit, the images whose ranking changes, new ties, and the
change of mAP; then the same on a head trained on synthetic data.

Usage: .venv/bin/python -m benchmarks.bench_evaluate [--images 2000,5000] [--labels 7586]
       [--precision]
       (issue 14's sizes: --images 5000,20000,80000)
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

from qks_pipeline.config import EvaluateConfig, ModelConfig
from qks_pipeline.stage_two.checkpoint import make_config, save_weights, write_config
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.store.features import create_cache
from qks_pipeline.store.fingerprint import make_fingerprint
from qks_pipeline.store.label_store import write_label_embeddings

OPEN_IMAGES_TEST = 125_436
UNSEEN = 400
# tiny tokens: the loader's blocks stay small; scores and labels are what N x C governs
T, D, E = 4, 16, 16
# issue 14, before: peak RSS GB, seconds (qks evaluate --baseline)
BEFORE = {5_000: (1.6, None), 20_000: (4.5, 54.0)}
BACKBONE = {"model": "bench", "pretrained": "none"}


def write_inputs(root: Path, n: int, c: int) -> None:
    """A test store (n images, c labels: ~5 positives and ~10 negatives an image, the rest unknown),
    a label store and a tiny checkpoint."""
    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(c)]
    seen = c - UNSEEN

    def labels(start: int, stop: int) -> np.ndarray:
        r = np.random.default_rng(start).random((stop - start, c), dtype=np.float32)
        return np.where(r < 5 / c, 1, np.where(r < 15 / c, -1, 0)).astype(np.int8)

    cache = create_cache(
        root / "test.zarr",
        fingerprint=make_fingerprint(BACKBONE, {"split": "test"}),
        token_shape=(T, D),
        num_views=1,
        shard_size=1024,
        label_names=names,
        num_seen=seen,
        labels=labels,
        paths=[f"{i}.jpg" for i in range(n)],
        manifest_index=np.arange(n),
        visual_proj=np.eye(D, E, dtype=np.float32),
    )
    for shard in range(cache.num_shards):
        rows = cache.shard_rows(shard)
        tokens = rng.standard_normal((rows.stop - rows.start, 1, T, D), dtype=np.float32)
        cache.write_shard(shard, tokens, np.ones(rows.stop - rows.start, bool), [])
    emb = rng.standard_normal((c, E)).astype(np.float32)
    clip = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    write_label_embeddings(
        root / "labels.zarr",
        names,
        emb,
        make_fingerprint(BACKBONE),
        clip,
        clip_template="{}",
        num_seen=seen,
    )
    head = QKS(ModelConfig(num_queries=4, num_layers=1, num_heads=2, ff_dim=16), D, E)
    (root / "ckpt").mkdir(exist_ok=True)
    save_weights(head, root / "ckpt" / "best.safetensors")
    config = make_config(
        head,
        T,
        BACKBONE,
        None,
        selection="val",
        selection_note="",
        label_names=names,
        num_seen=seen,
    )
    write_config(root / "ckpt", config)


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes; unlike ru_maxrss, not inherited over exec."""
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:")
    )
    return int(line.split()[1]) * 1024


def measure(root: Path, head: bool) -> None:
    """The child process: evaluate once, print {rss_before, rss_peak (bytes), seconds} as JSON."""
    from qks_pipeline.stage_two.evaluate import evaluate

    before = _peak_rss()
    start = time.perf_counter()
    how = {
        "checkpoint": root / "ckpt" if head else None,
        "baseline": "clip",
        "params": EvaluateConfig(),
    }
    tables = {"per_label": root / "ap.csv", "query_table": root / "q.csv"}
    evaluate(
        root / "test.zarr",
        root / "labels.zarr",
        root / "m.json",
        device="cpu",
        echo=lambda _: None,
        **how,
        **tables,
    )
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before": before, "rss_peak": _peak_rss(), "seconds": seconds}))


def memory(sizes: list[int], c: int, head: bool) -> None:
    what = "a tiny head + the CLIP baseline" if head else "--baseline clip, as issue 14 measured"
    print(
        f"qks evaluate ({what}; per-label CSV) at {c} labels ({c - UNSEEN} seen + {UNSEEN} unseen)"
    )
    print(
        f"{'images':>8} {'peak RSS':>10} {'imports':>9} {'B/entry':>8} {'time':>8} "
        f"{'before (issue 14)':>22}"
    )
    points = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="qks_bench_eval") as tmp:
            write_inputs(Path(tmp), n, c)
            child = [sys.executable, __file__, "--measure", tmp] + ["--head"] * head
            r = json.loads(
                subprocess.run(
                    child, check=True, capture_output=True, text=True
                ).stdout.splitlines()[-1]
            )
        points.append((n, r["rss_peak"], r["seconds"]))
        per = (r["rss_peak"] - r["rss_before"]) / (n * c)
        old = BEFORE.get(n) if c == 7586 and not head else None
        was = f"{old[0]:.1f} GB ({old[0] * 1e9 / r['rss_peak']:.1f}x)" if old else "-"
        was += f", {old[1]:.0f} s" if old and old[1] else ""
        print(
            f"{n:>8} {r['rss_peak'] / 1e9:>8.2f} GB {r['rss_before'] / 1e9:>6.2f} GB {per:>8.2f} "
            f"{r['seconds']:>6.1f} s {was:>22}"
        )
    if len(points) > 1:
        n, rss, sec = (np.array(v, float) for v in zip(*points, strict=True))
        b, a = np.polyfit(n * c, rss, 1)  # rss = a + b x (N x C)
        tb, ta = np.polyfit(n, sec, 1)
        m = OPEN_IMAGES_TEST
        print(
            f"linear fit: RSS = {a / 1e9:.2f} GB + {b:.2f} B x images x labels; "
            f"time = {ta:.1f} s + {tb * 1e3:.2f} ms x images"
        )
        print(
            f"Open Images test split ({m:,} images x {c:,} labels): "
            f"~{(a + b * m * c) / 1e9:.1f} GB peak RSS, ~{(ta + tb * m) / 60:.0f} min "
            "(before: ~25 GB by issue 14's 26 B/entry)"
        )


def _map(logits: torch.Tensor, labels: np.ndarray) -> float:
    from qks_pipeline.stage_two.metrics import evaluate_setting

    return evaluate_setting(logits.double().numpy(), labels, slice(None), [])["mAP"]


def precision(c: int, n: int = 256) -> None:
    """float16 tokens and arithmetic vs float32, on a tiny random head at ViT-B/16 widths."""
    torch.manual_seed(0)
    head = QKS(ModelConfig(num_queries=12, num_layers=2), 768, 512).eval()
    tokens = torch.randn(n, 197, 768) * 0.5  # roughly CLIP ViT-B/16's post-ln_post token scale
    emb = torch.randn(c, 512)
    labels = np.where(np.random.default_rng(0).random((n, c)) < 0.05, 1, -1).astype(np.int8)
    with torch.no_grad():
        ref = head(tokens, emb)
        rows = {"float16 tokens (the cache)": head(tokens.half().float(), emb)}
        rows["float16 arithmetic (autocast)"] = head.half()(tokens.half(), emb.half()).float()
    top = ref.abs().max()
    fp16_step = 2.0 ** (np.floor(np.log2(float(top))) - 10)
    print(
        f"logit precision, {n} random images x {c} labels "
        f"(largest |logit| {top:.1f}; fp16 step there {fp16_step:.4f})"
    )
    for name, got in rows.items():
        changed = (got.argsort(dim=1) != ref.argsort(dim=1)).any(dim=1).sum()
        ties = sum(len(r) - len(torch.unique(r)) for r in got) - sum(
            len(r) - len(torch.unique(r)) for r in ref
        )
        delta = _map(got, labels) - _map(ref, labels)
        change = float((got - ref).abs().max() / top)
        print(
            f"  {name:<30} max |change| / max |logit| {change:.1e}; "
            f"images whose ranking changes {int(changed)}/{n}; new ties {ties}; "
            f"mAP change {delta:+.1e}"
        )


def precision_trained() -> None:
    """The same on a head trained on synthetic data (qks_pipeline/store/synthetic.py; 24 labels, 8
    unseen): ZSL / GZSL / seen mAP with the whole head in float16 (harsher than autocast, which
    keeps LayerNorm and softmax in float32)."""
    from qks_pipeline.config import Params, TrainConfig
    from qks_pipeline.stage_two.checkpoint import load
    from qks_pipeline.stage_two.loader import open_loader
    from qks_pipeline.stage_two.metrics import evaluate_scores
    from qks_pipeline.stage_two.scoring import model_scorer, score_rows
    from qks_pipeline.stage_two.train import train
    from qks_pipeline.store.features import open_cache
    from qks_pipeline.store.label_store import read_label_embeddings
    from qks_pipeline.store.synthetic import make_synthetic

    with tempfile.TemporaryDirectory(prefix="qks_bench_fp16") as tmp:
        data = make_synthetic(
            tmp, num_train=512, num_test=256, num_seen=16, num_unseen=8, dim=64, embed_dim=32
        )
        model = ModelConfig(num_queries=4, num_layers=2, num_heads=4, ff_dim=128)
        p = Params(model=model, train=TrainConfig(epochs=8, batch_size=32, lr=3e-4))
        train(
            data.train,
            data.labels,
            Path(tmp) / "ck",
            params=p,
            progress_bar=False,
            echo=lambda _: None,
        )
        head = load(Path(tmp) / "ck", torch.device("cpu"))[0]
        emb = torch.from_numpy(read_label_embeddings(data.labels)[1])
        loader = open_loader(open_cache(data.test), batch_size=64, shuffle=False)
        f32 = score_rows(model_scorer(head, emb), loader, torch.device("cpu"))
        half = head.half()
        f16 = score_rows(lambda t: half(t.half(), emb.half()).float(), loader, torch.device("cpu"))
    a, b = (evaluate_scores(x.scores, x.labels, data.num_seen, [3, 5]) for x in (f32, f16))
    top = np.abs(f32.scores).max()
    shown = ", ".join(f"{s.upper()} {100 * a[s]['mAP']:.2f} -> {100 * b[s]['mAP']:.2f}" for s in a)
    print(
        f"trained synthetic head (largest |logit| {top:.1f}), "
        f"mAP float32 -> float16: {shown} (percent)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", default="2000,5000", help="comma-separated test-split sizes")
    ap.add_argument(
        "--labels", type=int, default=7586, help="vocabulary size (the last 400 unseen)"
    )
    ap.add_argument(
        "--head", action="store_true", help="evaluate a tiny QKS head as well as the CLIP baseline"
    )
    ap.add_argument(
        "--precision", action="store_true", help="also measure float16 tokens and arithmetic"
    )
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the measuring child process
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        return measure(args.measure, args.head)
    memory([int(x) for x in args.images.split(",")], args.labels, args.head)
    if args.precision:
        precision(min(args.labels, 1000))
        precision_trained()


if __name__ == "__main__":
    main()
