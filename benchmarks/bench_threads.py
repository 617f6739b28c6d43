"""Threads on a busy CPU: a short training and an extraction with torch's default intra-op threads
against 1 and 2 threads, and against qks's default (OMP_WAIT_POLICY=PASSIVE, set by
`devices.quiet_cpu_waits`), on an idle machine and beside one other CPU-bound process.

Each measurement runs in a fresh Python process (the OpenMP settings are read when torch loads),
timing the work only: `train` (2 epochs of a small head on a synthetic store,
`qks_pipeline/store/synthetic.py`) and `extract` (stage one's loop over JPEG files with an open_clip
model of random weights, decoding in the process). The busy neighbour is one Python loop, started
for the busy column, bounded in time and stopped at the end. Settings alternate within each round,
so every setting sees the same drift of a shared machine; each cell is the best and worst of the
rounds.

    .venv/bin/python -m benchmarks.bench_threads [--rounds 2] [--model ViT-B-32] [--images 24]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (environment, torch.set_num_threads argument or None for torch's default)
SETTINGS: dict[str, tuple[dict[str, str], int | str | None]] = {
    "torch default": ({}, None),
    "1 thread": ({}, 1),
    "2 threads": ({}, 2),
    # what the command line sets: OMP_WAIT_POLICY=PASSIVE, torch's default thread count
    "qks default (quiet_cpu_waits)": ({}, "qks"),
}
TASKS = ("train", "extract")
# the busy neighbour never outlives this many seconds, whatever happens to this script
BUSY_LIMIT_S = 1800
BUSY_LOOP = "\n".join(
    [
        "import time",
        f"end = time.monotonic() + {BUSY_LIMIT_S}",
        "while time.monotonic() < end:",
        "    pass",
    ]
)


def prepare(root: Path, images: int) -> None:
    """The synthetic store for `train` and the JPEG dataset for `extract`, once for every run."""
    from benchmarks.bench_extract import make_dataset
    from qks_pipeline.store.synthetic import make_synthetic

    make_synthetic(root / "synthetic", num_train=512, num_test=64, num_tokens=17, dim=64)
    (root / "jpegs").mkdir()
    make_dataset(root / "jpegs", images, (500, 375))


def run_task(task: str, root: Path, model: str, threads: int | str | None) -> float:
    """Seconds of one task in this process, after `threads` is applied."""
    from qks_pipeline import devices

    # before torch loads, as the command line does
    if threads == "qks":
        assert devices.quiet_cpu_waits()
    import torch

    if isinstance(threads, int):
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=root) as out:
        return _train(root, Path(out)) if task == "train" else _extract(root, Path(out), model)


def _train(root: Path, out: Path) -> float:
    from qks_pipeline.config import EvaluateConfig, ModelConfig, Params, TrainConfig
    from qks_pipeline.stage_two.train import train

    data = root / "synthetic"
    params = Params(
        model=ModelConfig(num_queries=4, num_layers=2, num_heads=4, ff_dim=128),
        train=TrainConfig(epochs=2, batch_size=16, lr=1e-3, val_fraction=0.25),
        evaluate=EvaluateConfig(batch_size=64),
    )
    start = time.perf_counter()
    kwargs = {"params": params, "device": "cpu", "progress_bar": False, "echo": lambda _: None}
    train(data / "train.zarr", data / "labels.zarr", out / "run", **kwargs)
    return time.perf_counter() - start


def _extract(root: Path, out: Path, model: str) -> float:
    from qks_pipeline.config import BackboneConfig, ExtractConfig
    from qks_pipeline.stage_one.extract import extract

    data = root / "jpegs"
    cfg = ExtractConfig(batch_size=8, workers=0, shard_size=8, shuffle=False)
    result = extract(
        data / "dataset",
        "train",
        data / "images",
        out / "store.zarr",
        backbone=BackboneConfig(model, "none"),
        cfg=cfg,
        device="cpu",
    )
    return result.loop_seconds


def measure(task: str, setting: str, root: Path, model: str) -> float:
    """Seconds of `task` under `setting`, in a fresh process."""
    env_extra, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    args = [sys.executable, "-m", "benchmarks.bench_threads", "--run", task, "--root", str(root)]
    args += ["--model", model, "--threads", json.dumps(threads)]
    done = subprocess.run(
        args, env=env | env_extra, capture_output=True, text=True, check=False, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"{task} / {setting} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def measure_all(
    root: Path, model: str, rounds: int, runs: list[tuple[str, str]], busy: bool
) -> dict[tuple[str, str], list]:
    """(task, setting) -> seconds of each round, beside a busy neighbour when `busy`."""
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    times: dict[tuple[str, str], list] = {}
    try:
        for _ in range(rounds):
            for task, setting in runs:
                seconds = measure(task, setting, root, model)
                times.setdefault((task, setting), []).append(seconds)
                where = "busy" if busy else "idle"
                print(f"  {where} {task:<8} {setting:<34} {seconds:7.2f} s", flush=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return times


def _cell(seconds: list[float]) -> str:
    return f"{min(seconds):6.2f}-{max(seconds):6.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model of `extract`")
    ap.add_argument("--images", type=int, default=24, help="JPEGs (500x375) `extract` reads")
    ap.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"some of: {', '.join(SETTINGS)}"
    )
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"some of: {', '.join(TASKS)}")
    # internal: one measurement in this process
    ap.add_argument("--run", choices=TASKS, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="null", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(run_task(args.run, args.root, args.model, json.loads(args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args.images)
        runs = [(t, s) for t in args.tasks.split(",") for s in args.settings.split(",")]
        idle = measure_all(root, args.model, args.rounds, runs, busy=False)
        busy = measure_all(root, args.model, args.rounds, runs, busy=True)
    print(f"\n{os.cpu_count()} CPUs; best-worst of {args.rounds} rounds, seconds of the work")
    print("train: 2 epochs, 384 rows of 17 x 64 tokens, 4 queries, 2 layers, batch 16")
    print(
        f"extract: {args.model} (random weights), {args.images} JPEGs 500x375, batch 8, in process"
    )
    print(f"{'task':<8} {'setting':<34} {'idle':>13} {'busy neighbour':>15}")
    for key in runs:
        print(f"{key[0]:<8} {key[1]:<34} {_cell(idle[key]):>13} {_cell(busy[key]):>15}")


if __name__ == "__main__":
    main()
