"""A training output directory is one run's: two `qks train --out DIR` at once (the second must be
refused, the first must end as an uninterrupted run), a resume on another training store or label
store (refused, the directory unchanged), and the temporary file of a save killed half-way (removed
by the next start, which ends as an uninterrupted run)."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.faults.outcome import Outcome
from tests.reliability.faults.training import TrainSetup, compare_runs, train_argv
from tests.reliability.harness import (
    Runner,
    cli,
    error_problems,
    last_line,
    store_files,
    wait_until,
)

LOCK_WORDS = "another training run is writing this directory"


def _reference(runner: Runner, work: Path, setup: TrainSetup) -> Path:
    reference = work / "reference"
    run = runner.run(train_argv(setup, reference), work / "reference.log")
    assert run.status == 0, f"reference training failed: {last_line(run.output)}"
    return reference


def concurrent_training(runner: Runner, work: Path, setup: TrainSetup, trials: int) -> Outcome:
    """A second `qks train` on the same --out while the first trains."""
    outcome = Outcome("two qks train --out DIR at once")
    reference = _reference(runner, work, setup)
    for i in range(trials):
        out = work / f"run{i}"
        first = runner.start(train_argv(setup, out), work / f"first{i}.log")
        # the first holds the lock once it writes config.json
        wait_until(first, lambda out=out: (out / "config.json").exists())
        overlapped = first.poll() is None
        second = runner.run(train_argv(setup, out), work / f"second{i}.log")
        first.wait()
        if not overlapped:
            outcome.note(f"trial {i}: the first run ended before the second started")
        refused = second.status == 1 and LOCK_WORDS in last_line(second.output)
        problems = error_problems(second.output, str(out)) if second.status else []
        differs = compare_runs(out, reference)
        if differs or first.status != 0:
            outcome.note(f"trial {i}: first run exit {first.status}, differs in {differs}")
        if not refused:
            outcome.note(f"trial {i}: second run exit {second.status}: {last_line(second.output)}")
        wrong = first.status != 0 or bool(differs) or (overlapped and second.status == 0)
        outcome.add(wrong=wrong, unclear=bool(problems), ok=refused and not problems)
    return outcome


def mismatched_resume(work: Path, setup: TrainSetup) -> Outcome:
    """A finished run resumed on another training store, then on another label store (synthetic
    stores of another seed): refused in one line naming which, nothing in the directory changed."""
    from qks_pipeline.store.synthetic import make_synthetic

    outcome = Outcome("resume on another training or label store")
    out = work / "run"
    code, output, _ = cli(*train_argv(setup, out))
    assert code == 0, output
    other = make_synthetic(work / "other", num_train=128, num_test=32, seed=1)
    cases = {
        "training store": TrainSetup(other.train, setup.labels, setup.params),
        "label store": TrainSetup(setup.train, other.labels, setup.params),
    }
    for what, mixed in cases.items():
        before = store_files(out)
        code, output, escaped = cli(*train_argv(mixed, out))
        refused = code == 1 and f"({what}" in last_line(output)
        problems = error_problems(output, str(out)) if code else []
        problems += [f"escaped {type(escaped).__name__}"] if escaped else []
        changed = store_files(out) != before
        if not refused or problems or changed:
            outcome.note(f"{what}: exit {code}, changed {changed}, {problems}: {last_line(output)}")
        outcome.add(lost=changed, wrong=not refused, unclear=bool(problems), ok=not problems)
    return outcome


def killed_save_litter(runner: Runner, work: Path, setup: TrainSetup, trials: int) -> Outcome:
    """A run killed after its first epoch, with the temporary file a save killed half-way leaves
    (`.last_state.pt.tmp<pid>`), then the same command: the file is gone and the run ends as an
    uninterrupted one."""
    outcome = Outcome("temporary files of a killed save")
    reference = _reference(runner, work, setup)
    for i in range(trials):
        out = work / f"run{i}"
        run = runner.start(train_argv(setup, out), work / f"killed{i}.log")
        wait_until(run, lambda out=out: (out / "last_state.pt").exists())
        if run.poll() is None:
            run.kill()
        else:
            outcome.note(f"trial {i}: the run ended before the kill")
        # what a kill inside `atomic_write` leaves: the first bytes of the next resume point
        litter = out / f".last_state.pt.tmp{run.pid}"
        litter.write_bytes((out / "last_state.pt").read_bytes()[:4096])
        rerun = runner.run(train_argv(setup, out), work / f"rerun{i}.log")
        left = [p.name for p in out.iterdir() if ".tmp" in p.name]
        differs = compare_runs(out, reference)
        outcome.litter_left(left, "a killed save")
        if rerun.status != 0 or differs:
            outcome.note(f"trial {i}: rerun exit {rerun.status}, differs in {differs}")
        outcome.add(wrong=rerun.status != 0 or bool(differs) or bool(left))
    return outcome
