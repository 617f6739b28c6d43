"""Two extractions on one store at once: started together, a second while the first creates the
store, a second with other weights while the first runs. A lock that refuses the second writer is
a safe outcome; a lost write or a store that passes as complete with the wrong content is not."""

from __future__ import annotations

import json
from pathlib import Path

from tests.reliability.faults.outcome import Case, Outcome
from tests.reliability.harness import (
    ImageData,
    Runner,
    compare_trees,
    error_problems,
    extract_argv,
    last_line,
    markers,
    passes_as_complete,
    store_state,
    wait_until,
)
from tests.tiny import TinyClip

# what a refusal of a second writer should say
LOCK_WORDS = ("another extraction", "lock")


def _pair_trial(
    case: Case, work: Path, argv: list[str], store: Path, i: int, barrier: bool
) -> None:
    runner = case.runner
    reference = case.reference
    outcome = case.outcome
    gate = work / f"pair{i}.barrier" if barrier else None
    runs = [runner.start(argv, work / f"pair{i}-{name}.log", barrier=gate) for name in "ab"]
    for run in runs:
        run.wait()
    failed = [run for run in runs if run.status != 0]
    unclear = any(error_problems(run.output) for run in failed)
    refused_cleanly = all(any(w in last_line(r.output) for w in LOCK_WORDS) for r in failed)
    for run in failed:
        outcome.note(f"exit {run.status}: {last_line(run.output)[:160]}")
    complete = passes_as_complete(store)
    diff = compare_trees(store, reference)
    if store_state(store).startswith("crashes"):
        outcome.note(
            "left a store that `qks cache verify` cannot open without a traceback "
            f"({store_state(store)})"
        )
    # a run said it finished, yet the store is not complete
    lost = len(failed) < 2 and not complete
    if not diff.equal:
        outcome.note(f"store vs a single run: {diff.summary()}")
    if failed and not refused_cleanly:
        outcome.note("a run failed without saying another extraction holds the store")
    stuck = False
    # can a plain rerun finish the job, or is the store broken for good?
    if not diff.equal:
        rerun = runner.run(argv, work / f"pair{i}-rerun.log")
        stuck = rerun.status != 0 or not compare_trees(store, reference).equal
        if stuck:
            outcome.note(
                f"the store left behind breaks the rerun too: {last_line(rerun.output)[:120]}"
            )
    outcome.add(
        lost=lost or stuck, wrong=complete and not diff.equal, unclear=unclear, ok=diff.equal
    )


def concurrent_extractions(
    runner: Runner, work: Path, data: ImageData, clip: TinyClip, trials: int, barrier: bool = False
) -> Outcome:
    """Two `qks extract` with the same settings on the same --out, started at the same moment
    (`barrier`: and held so that they create the store at the same moment). Either the second
    refuses cleanly (a lock), or both finish; the store must verify and equal a single run's. When
    it does not, one plain rerun shows whether the store left behind can still be completed; a
    store no rerun can complete counts as data lost."""
    outcome = Outcome(
        "two qks extract on one store at once" + (" (creation together)" if barrier else "")
    )
    reference = work / "reference.zarr"
    runner.run(extract_argv(data, clip, reference, 2), work / "reference.log")
    case = Case(runner, reference, outcome)
    for i in range(trials):
        store = work / f"pair{i}.zarr"
        _pair_trial(case, work, extract_argv(data, clip, store, 2), store, i, barrier)
    return outcome


def create_while_creating(runner: Runner, work: Path, data: ImageData, clip: TinyClip) -> Outcome:
    """A deterministic interleaving of two extractions with the same settings on a new store: the
    first is paused just before it puts its freshly built store in place (`hold_replace`); the
    second starts and runs; then the first goes on. With a lock the second refuses at once (or
    waits) and the first finishes; the store must then equal a single run's, and no run may report
    success for a store that is not there."""
    outcome = Outcome("second extraction while the first creates the store")
    reference = work / "reference.zarr"
    store = work / "shared.zarr"
    gate = work / "gate"
    runner.run(extract_argv(data, clip, reference, 4), work / "reference.log")
    first = runner.start(extract_argv(data, clip, store, 4), work / "first.log", hold_replace=gate)
    wait_until(first, lambda: Path(f"{gate}.held").exists())
    if not Path(f"{gate}.held").exists():
        first.kill()
        raise RuntimeError(f"the first run never reached store creation: {last_line(first.output)}")
    second = runner.start(extract_argv(data, clip, store, 4), work / "second.log")
    # a lock that waits instead of refusing: go on after 30 s
    wait_until(second, lambda: False, timeout=30)
    Path(f"{gate}.go").touch()
    first.wait()
    second.wait()
    runs = (first, second)
    diff = compare_trees(store, reference)
    complete = passes_as_complete(store)
    for run, name in zip(runs, ("first", "second"), strict=True):
        outcome.note(f"{name} exit {run.status}: {last_line(run.output)[:140]}")
    outcome.note(f"store: {store_state(store)}; vs a single run: {diff.summary()}")
    lost = any(r.status == 0 for r in runs) and not complete
    unclear = any(error_problems(r.output) for r in runs if r.status != 0)
    outcome.add(lost=lost, wrong=complete and not diff.equal, unclear=unclear, ok=diff.equal)
    return outcome


def store_backbone_sha(store: Path) -> str | None:
    attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    return attrs.get("fingerprint", {}).get("backbone", {}).get("weights_sha256")


def replace_while_running(
    runner: Runner, work: Path, data: ImageData, clip: TinyClip, other: TinyClip
) -> Outcome:
    """A second `qks extract --replace-stale` with other weights starts on a store while a first
    extraction is writing it (the first is slowed to 0.7 s per shard of 4 images so the second
    starts mid-run). Safe outcomes: the second refuses (a lock), or the final store equals the
    clean store of the weights its fingerprint names."""
    outcome = Outcome("second extraction (other weights) while one runs")
    shard_size = 4
    # clean stores by the backbone weights' sha256
    refs = {}
    for c, name in ((clip, "ref_a.zarr"), (other, "ref_b.zarr")):
        runner.run(extract_argv(data, c, work / name, shard_size), work / f"{name}.log")
        refs[store_backbone_sha(work / name)] = work / name
    store = work / "shared.zarr"
    first = runner.start(
        extract_argv(data, clip, store, shard_size), work / "first.log", slow_write=0.7
    )
    wait_until(first, lambda: len(markers(store)) >= 1)
    second = runner.run(
        [*extract_argv(data, other, store, shard_size), "--replace-stale"], work / "second.log"
    )
    first.wait()
    claimed = refs.get(store_backbone_sha(store)) if (store / "zarr.json").exists() else None
    diff = compare_trees(store, claimed) if claimed else None
    refused = second.status != 0 and any(w in last_line(second.output) for w in LOCK_WORDS)
    complete = passes_as_complete(store)
    outcome.note(
        f"first exit {first.status}, second exit {second.status}: {last_line(second.output)[:120]}"
    )
    if diff is not None and not diff.equal:
        outcome.note(
            f"store claims weights {store_backbone_sha(store)[:8]} but differs from their clean "
            f"store: {len(diff.different)} files, e.g. {diff.different[:2]}; cache verify "
            f"{'passes' if complete else 'fails'}"
        )
    wrong = diff is None or not diff.equal
    unclear = any(error_problems(r.output) for r in (first, second) if r.status != 0)
    ok = (refused or second.status == 0) and not wrong
    outcome.add(lost=not complete, wrong=complete and wrong, unclear=unclear, ok=ok)
    return outcome
