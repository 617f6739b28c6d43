"""SIGKILL at random moments, during `qks extract` and during `qks train`: after each round of
kills the same command runs to the end, and its output must equal an uninterrupted run's."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from tests.reliability.faults.outcome import Case, Outcome
from tests.reliability.faults.training import (
    TrainSetup,
    checkpoint_problems,
    compare_runs,
    log_rows,
    train_argv,
)
from tests.reliability.harness import (
    ImageData,
    Run,
    Runner,
    compare_trees,
    done_but_wrong,
    extract_argv,
    last_line,
    markers,
    wait_until,
)
from tests.tiny import TinyClip


@dataclass
class Kill:
    """What one kill did: lost work marked done, or left something marked done that is wrong."""

    lost: bool
    wrong: bool


# -------------------------------------------------------------------------------- during extraction
@dataclass
class Timing:
    startup: float  # launch -> first done marker
    shard: float  # seconds per shard after that


def timed_extract(runner: Runner, argv: list[str], store: Path, log: Path) -> Timing:
    """Run an extraction to the end, timing its start-up and its shards."""
    start = time.monotonic()
    first = None
    run = runner.start(argv, log)
    while run.poll() is None:
        if first is None and markers(store):
            first = time.monotonic() - start
        time.sleep(0.002)
    assert run.status == 0, f"reference extraction failed: {last_line(run.output)}"
    total = time.monotonic() - start
    shards = len(markers(store))
    first = first if first is not None else total
    return Timing(first, max(total - first, 1e-3) / max(shards - 1, 1))


def kill_at_random(
    run: Run, store: Path, rng: random.Random, timing: Timing, early: bool
) -> str | None:
    """SIGKILL `run` at a random moment: `early`, at a random time since launch (model loading,
    store creation, first shard); otherwise after 0-2 more shards finish, plus up to 1.5 shard
    times (mid-shard, mid-write, between shards). Returns where it landed, or None when the run
    finished first."""
    if early:
        deadline = time.monotonic() + rng.uniform(0, timing.startup + timing.shard)
        wait_until(run, lambda: time.monotonic() >= deadline)
        phase = "early (loading, creating the store, first shard)"
    else:
        target = len(markers(store)) + rng.randint(0, 2)
        wait_until(run, lambda: len(markers(store)) >= target)
        deadline = time.monotonic() + rng.uniform(0, 1.5 * timing.shard)
        wait_until(run, lambda: time.monotonic() >= deadline)
        phase = "while shards were computed and written"
    if run.poll() is not None:
        return None
    run.kill()
    return phase if (store / "zarr.json").exists() else "before the store existed"


def _kill_round(
    case: Case, argv: list[str], store: Path, kills: int, rng: random.Random, timing: Timing
) -> list[Kill]:
    """Kill and rerun one store until `kills` kills landed or it completed; each kill's checks."""
    outcome = case.outcome
    records: list[Kill] = []
    while len(records) < kills:
        before = markers(store)
        run = case.runner.start(argv, store.parent / f"{store.name}-{len(records)}.log")
        early = (outcome.trials + len(records)) % 5 == 2
        phase = kill_at_random(run, store, rng, timing, early=early)
        if phase is None:
            break
        after = markers(store)
        lost = any(after.get(name) != inode for name, inode in before.items())
        wrong = done_but_wrong(store, case.reference)
        if wrong:
            outcome.note(f"after a kill ({phase}), marked done but wrong: {wrong[:3]}")
        if lost:
            outcome.note("a kill lost or rewrote a shard that was already marked done")
        outcome.where[phase] += 1
        records.append(Kill(lost, bool(wrong)))
    return records


def extraction_kills(
    runner: Runner,
    work: Path,
    data: ImageData,
    clip: TinyClip,
    kills: int,
    seed: int = 0,
    shard_size: int = 2,
) -> Outcome:
    """SIGKILL `qks extract` `kills` times at random moments; after each round of kills the same
    command runs to the end and the store must equal an uninterrupted run's, file for file and
    byte for byte."""
    outcome = Outcome(f"SIGKILL during qks extract (shard size {shard_size})")
    reference = work / "reference.zarr"
    # a runner's first run can start slower
    warm = work / "warm-up.zarr"
    timed_extract(runner, extract_argv(data, clip, warm, shard_size), warm, work / "warm-up.log")
    timing = timed_extract(
        runner, extract_argv(data, clip, reference, shard_size), reference, work / "reference.log"
    )
    rng = random.Random(seed)
    round_no = 0
    while outcome.trials < kills:
        store = work / f"round{round_no}.zarr"
        argv = extract_argv(data, clip, store, shard_size)
        case = Case(runner, reference, outcome)
        records = _kill_round(case, argv, store, kills - outcome.trials, rng, timing)
        final = runner.run(argv, work / f"round{round_no}-final.log")
        diff = compare_trees(store, reference)
        if final.status != 0 or not diff.equal:
            outcome.note(
                f"round {round_no}: final run exit {final.status}, "
                f"store vs clean run: {diff.summary()}"
            )
        outcome.litter_left(diff.litter, "killed writes in the store")
        for r in records:
            outcome.add(lost=r.lost or final.status != 0, wrong=r.wrong or not diff.equal)
        round_no = outcome.rounds = round_no + 1
    return outcome


# ---------------------------------------------------------------------------------- during training
def _resume_epoch(out: Path) -> int:
    import torch

    state = out / "last_state.pt"
    return torch.load(state, weights_only=True)["progress"]["epoch"] if state.exists() else 0


def timed_train(runner: Runner, argv: list[str], out: Path) -> float:
    """Run training to the end; returns seconds per epoch (after start-up)."""
    start = time.monotonic()
    first = None
    run = runner.start(argv, out.parent / f"{out.name}.log")
    while run.poll() is None:
        if first is None and log_rows(out):
            first = time.monotonic()
        time.sleep(0.005)
    assert run.status == 0, f"reference training failed: {last_line(run.output)}"
    epochs = len(log_rows(out))
    return (time.monotonic() - (first or start)) / max(epochs - 1, 1)


def _kill_training(run: Run, out: Path, rng: random.Random, epoch_s: float) -> bool:
    """SIGKILL after 0-1 more epochs plus a random part of one (mid-epoch or mid-checkpoint)."""
    target = len(log_rows(out)) + rng.randint(0, 1)
    wait_until(run, lambda: len(log_rows(out)) >= target)
    deadline = time.monotonic() + rng.uniform(0, epoch_s)
    wait_until(run, lambda: time.monotonic() >= deadline)
    if run.poll() is not None:
        return False
    run.kill()
    return True


def training_kills(
    runner: Runner, work: Path, setup: TrainSetup, kills: int, epochs: int, seed: int = 0
) -> Outcome:
    """SIGKILL `qks train` `kills` times at random moments; each rerun resumes, and the final
    weights, config and log equal an uninterrupted run's (CPU, same seed)."""
    outcome = Outcome("SIGKILL during qks train")
    reference = work / "reference"
    epoch_s = timed_train(runner, train_argv(setup, reference), reference)
    rng = random.Random(seed)
    round_no = 0
    while outcome.trials < kills:
        out = work / f"round{round_no}"
        argv = train_argv(setup, out)
        records: list[Kill] = []
        while outcome.trials + len(records) < kills:
            before = _resume_epoch(out)
            run = runner.start(argv, work / f"round{round_no}-{len(records)}.log")
            if not _kill_training(run, out, rng, epoch_s):
                break
            broken = checkpoint_problems(out, epochs)
            lost = _resume_epoch(out) < before
            outcome.where[f"in epoch {_resume_epoch(out) + 1}"] += 1
            if broken:
                outcome.note(f"broken checkpoint files after a kill: {broken}")
            records.append(Kill(lost, bool(broken)))
        final = runner.run(argv, work / f"round{round_no}-final.log")
        diff = compare_runs(out, reference) if final.status == 0 else ["final run failed"]
        outcome.litter_left(sorted(p.name for p in out.glob(".*.tmp*")), "killed checkpoint writes")
        if diff:
            outcome.note(
                f"round {round_no}: differs from the clean run: {diff} ({last_line(final.output)})"
            )
        for r in records:
            outcome.add(lost=r.lost, wrong=r.wrong or bool(diff))
        round_no = outcome.rounds = round_no + 1
    return outcome
