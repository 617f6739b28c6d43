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
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.reliability import corpus
from tests.reliability.faults.bad_files import bad_checkpoint_files, bad_weights_files
from tests.reliability.faults.concurrent import (
    concurrent_extractions,
    create_while_creating,
    replace_while_running,
)
from tests.reliability.faults.config_values import config_bounds
from tests.reliability.faults.damage import (
    damaged_feature_stores,
    damaged_indexes,
    damaged_label_stores,
    lost_index_chunks,
    lost_shard_files,
    make_pipeline,
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
from tests.reliability.faults.training import TrainSetup, make_train_setup
from tests.reliability.faults.training_output import (
    concurrent_training,
    killed_save_litter,
    mismatched_resume,
)
from tests.reliability.harness import ImageData, Runner, make_image_data
from tests.tiny import TinyClip, make_tiny_clip


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
        *_damage_cases(runner, work, small, clip, setup, small_setup),
    ]
    return [_row(name, work, make) for name, make in cases]


def _damage_cases(
    runner: Runner,
    work: Path,
    small: ImageData,
    clip: TinyClip,
    setup: TrainSetup,
    small_setup: TrainSetup,
) -> list[tuple[str, Callable[[Path], Outcome]]]:
    """Damaged stores, bad files, training output, config values; the stores and files on one
    clean run of the pipeline, made once."""
    pipeline = functools.cache(lambda: make_pipeline(work / "pipeline", small, clip))
    return [
        ("missing_chunks", lambda w: damaged_feature_stores(pipeline(), w, "missing")),
        ("missing_label_chunks", lambda w: damaged_label_stores(pipeline(), w, "missing")),
        ("flipped_chunks", lambda w: damaged_feature_stores(pipeline(), w, "flipped")),
        ("flipped_label_chunks", lambda w: damaged_label_stores(pipeline(), w, "flipped")),
        ("lost_shard_files", lambda w: lost_shard_files(pipeline(), w)),
        ("missing_index_chunks", lambda w: damaged_indexes(pipeline(), w, "missing")),
        ("flipped_index_chunks", lambda w: damaged_indexes(pipeline(), w, "flipped")),
        ("lost_index_chunks", lambda w: lost_index_chunks(pipeline(), w)),
        ("train_together", lambda w: concurrent_training(runner, w, setup, 3)),
        ("resume_mismatch", lambda w: mismatched_resume(w, small_setup)),
        ("killed_save", lambda w: killed_save_litter(runner, w, setup, 3)),
        ("bad_weights", lambda w: bad_weights_files(pipeline(), w)),
        ("bad_checkpoints", lambda w: bad_checkpoint_files(pipeline(), w)),
        ("config_bounds", lambda w: config_bounds(w, small_setup)),
    ]


def totals_line(outcomes: list[Outcome]) -> str:
    """The totals the report must keep at zero, in words."""
    trials = sum(o.trials for o in outcomes)
    wrong = sum(o.wrong for o in outcomes)
    lost = sum(o.data_lost for o in outcomes)
    unclear = sum(o.unclear for o in outcomes)
    return (
        f"totals: {trials} trials; {wrong} wrong results (silent or wrongly refused), {lost} with "
        f"data lost, {unclear} unclear errors (tracebacks included)"
    )


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
    print(f"\n{totals_line(outcomes)}")
    return int(any(o.data_lost or o.wrong for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
