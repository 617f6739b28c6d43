"""Run the reliability fault cases and print a table: trials, survived, data lost, wrong results.

    .venv/bin/python -m tests.reliability.report [--kills 20] [--train-kills 5] [--trials 4]
        [--pairs 10] [--fuzz 200] [--spawn] [--work DIR] [--seed 0]

Run it from the repository root. The cases are those of the tests beside it (the same functions:
faults/, one module per fault kind, and corpus.py); what each count means is in faults/outcome.py's
docstring. Runs are real processes that are SIGKILLed; by default they are forked from a warm
process (fast); `--spawn` starts each as a fresh interpreter, as a user's shell does (about 4.5 s
more per run). Mounting the small tmpfs of the disk-full cases needs root; without it those rows say
so. Exits 1 when any trial lost data or gave a wrong result.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.reliability import corpus
from tests.reliability.faults.concurrent import (
    concurrent_extractions,
    create_while_creating,
    replace_while_running,
)
from tests.reliability.faults.disk_full import (
    disk_full_checkpoint,
    disk_full_extraction,
    file_size_limit_extraction,
    spread,
)
from tests.reliability.faults.kills import extraction_kills, training_kills
from tests.reliability.faults.outcome import Outcome, Unavailable, format_table
from tests.reliability.faults.stale import make_stale_setup, stale_inputs
from tests.reliability.faults.training import make_train_setup
from tests.reliability.harness import Runner, make_image_data
from tests.tiny import make_tiny_clip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--kills", type=int, default=20, help="SIGKILLs of qks extract (the extraction soak)"
    )
    p.add_argument("--train-kills", type=int, default=5, help="SIGKILLs of qks train")
    p.add_argument(
        "--trials",
        type=int,
        default=4,
        help="disk-full trials, for extraction and for checkpoints each",
    )
    p.add_argument("--pairs", type=int, default=10, help="pairs of simultaneous extractions")
    p.add_argument("--fuzz", type=int, default=200, help="hypothesis-generated manifests")
    p.add_argument("--spawn", action="store_true", help="start every run as a fresh interpreter")
    p.add_argument(
        "--work", type=Path, help="keep the runs here (default: a temporary directory, removed)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _row(name: str, work: Path, make: Callable[[Path], Outcome]) -> Outcome:
    """Run one case in its own directory; one that cannot run here gives 0 trials and the reason."""
    start = time.monotonic()
    (work / name).mkdir(parents=True, exist_ok=True)
    try:
        outcome = make(work / name)
    except Unavailable as e:
        outcome = Outcome(name.replace("_", " "), notes=[f"not run: {e}"])
    print(
        f"  {outcome.fault}: {outcome.trials} trials, {time.monotonic() - start:.0f} s",
        file=sys.stderr,
    )
    return outcome


def run_all(args: argparse.Namespace, runner: Runner, work: Path) -> list[Outcome]:
    clip = make_tiny_clip(work / "clip", 0)
    other = make_tiny_clip(work / "clip", 1)
    small = make_image_data(work / "small", 24)
    big = make_image_data(work / "big", 64)
    setup = make_train_setup(work / "train_setup", num_train=384, epochs=6)
    small_setup = make_train_setup(work / "small_train_setup", num_train=128, epochs=3)
    s = args.seed
    fractions = spread(args.trials, s)
    cases: list[tuple[str, Callable[[Path], Outcome]]] = [
        ("kill_extract", lambda w: extraction_kills(runner, w, big, clip, args.kills, seed=s)),
        ("kill_train", lambda w: training_kills(runner, w, setup, args.train_kills, 6, seed=s)),
        ("disk_extract", lambda w: disk_full_extraction(runner, w, small, clip, fractions)),
        ("fsize_extract", lambda w: file_size_limit_extraction(runner, w, small, clip)),
        (
            "disk_checkpoint",
            lambda w: disk_full_checkpoint(runner, w, small_setup, 3, fractions, state_write=True),
        ),
        ("pairs", lambda w: concurrent_extractions(runner, w, small, clip, args.pairs)),
        (
            "pairs_together",
            lambda w: concurrent_extractions(runner, w, small, clip, 5, barrier=True),
        ),
        ("create_while_creating", lambda w: create_while_creating(runner, w, small, clip)),
        ("replace_running", lambda w: replace_while_running(runner, w, small, clip, other)),
        ("stale", lambda w: stale_inputs(make_stale_setup(w, small, clip, other))),
        ("manifests", lambda w: corpus.manifest_outcome(w, args.fuzz, seed=s)),
        ("images", lambda w: corpus.image_outcome(w, clip)),
        ("labels", lambda w: corpus.label_outcome(w, clip)),
    ]
    return [_row(name, work, make) for name, make in cases]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="qks_reliability_"))
    start = time.monotonic()
    try:
        with Runner("spawn" if args.spawn else "fork") as runner:
            outcomes = run_all(args, runner, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    mode = "fresh interpreters" if args.spawn else "forked from a warm process"
    print(
        f"\nqks reliability report ({mode}, seed {args.seed}, {time.monotonic() - start:.0f} s)\n"
    )
    print(format_table(outcomes))
    return int(any(o.data_lost or o.wrong for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
