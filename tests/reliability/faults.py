"""Fault cases shared by the reliability tests and their report (report.py): each returns an
`Outcome`.

Counting, per trial (one injected fault):
- survived: the pipeline ended in a correct state: nothing marked done was wrong, and the output (after a rerun once the
  fault is removed, where the case has one) equals a clean run's, or the refusal was the right
  decision. How the failure was reported does not count here: a traceback is an unclear error;
- data lost: work that had been marked done disappeared or had to be redone, a command reported success while its
  output lacked data, or a store was left that no rerun can complete;
- wrong results: something that passes as finished (a done marker, a complete store, a checkpoint) differs from what
  a clean run writes, or a refusal/acceptance was the wrong decision;
- unclear errors: a failure reported with a Python traceback, or without one `Error:` line naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from qks_pipeline.store.synthetic import make_synthetic
from tests.reliability.harness import (
    ImageData,
    Run,
    Runner,
    compare_trees,
    done_but_wrong,
    error_problems,
    extract_argv,
    last_line,
    markers,
    store_files,
)
from tests.tiny import TINY_CONFIG, TinyClip, embed_args, make_tiny_clip, train_args


@dataclass
class Outcome:
    """The tally of one fault case (see the module docstring for what each count means)."""

    fault: str
    trials: int = 0
    survived: int = 0
    data_lost: int = 0
    wrong: int = 0
    unclear: int = 0
    # trials after which temporary files of failed or killed writes were left behind
    litter: int = 0
    rounds: int = 0  # kill cases: outputs driven from scratch to complete (each took several kills)
    notes: list[str] = field(default_factory=list)
    # where the faults landed (e.g. the phase a kill hit)
    where: Counter = field(default_factory=Counter)

    def add(
        self, *, lost: bool = False, wrong: bool = False, unclear: bool = False, ok: bool = True
    ) -> None:
        """Count one trial; it survived when nothing went wrong and `ok`."""
        self.trials += 1
        self.data_lost += lost
        self.wrong += wrong
        self.unclear += unclear
        self.survived += ok and not (lost or wrong)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def litter_left(self, files: list[str], by: str) -> None:
        """Count and note temporary files that writes `by` (e.g. "killed writes") left behind, if
        any."""
        if files:
            self.litter += 1
            self.note(f"temporary files left by {by}: {files[:2]}")

    @property
    def clean(self) -> bool:
        return (
            self.trials > 0 and self.survived == self.trials and not (self.data_lost or self.wrong)
        )


def format_table(outcomes: list[Outcome]) -> str:
    """The report's table: one row per fault case, then the notes."""
    head = ("fault injected", "trials", "survived", "data lost", "wrong results", "unclear errors")
    rows = [(o.fault, o.trials, o.survived, o.data_lost, o.wrong, o.unclear) for o in outcomes]
    width = max(len(head[0]), *(len(r[0]) for r in rows))
    lines = [f"{head[0]:<{width}}" + "".join(f"{h:>16}" for h in head[1:])]
    lines.append("-" * len(lines[0]))
    lines += [f"{r[0]:<{width}}" + "".join(f"{v:>16}" for v in r[1:]) for r in rows]
    total = [sum(r[i] for r in rows) for i in range(1, 6)]
    lines.append("-" * len(lines[0]))
    lines.append(f"{'total':<{width}}" + "".join(f"{v:>16}" for v in total))
    landed = {
        o.fault: "; ".join(f"{k}: {v}" for k, v in o.where.most_common())
        for o in outcomes
        if o.where
    }
    notes = [f"  {fault}: landed {where}" for fault, where in landed.items()]
    notes += [f"  {o.fault}: {n}" for o in outcomes for n in o.notes]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


# ------------------------------------------------------------------------------------------ kill during extraction
@dataclass
class Timing:
    startup: float  # launch -> first done marker
    shard: float  # seconds per shard after that


def timed_extract(runner: Runner, argv: list[str], store: Path, log: Path) -> Timing:
    """Run an extraction to the end, timing its start-up and its shards."""
    start, first = time.monotonic(), None
    run = runner.start(argv, log)
    while run.poll() is None:
        if first is None and markers(store):
            first = time.monotonic() - start
        time.sleep(0.002)
    assert run.status == 0, f"reference extraction failed: {last_line(run.output)}"
    total, shards = time.monotonic() - start, len(markers(store))
    first = first if first is not None else total
    return Timing(first, max(total - first, 1e-3) / max(shards - 1, 1))


def _wait(run: Run, until, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while run.poll() is None and not until() and time.monotonic() < deadline:
        time.sleep(0.002)


def kill_at_random(
    run: Run, store: Path, rng: random.Random, timing: Timing, early: bool
) -> str | None:
    """SIGKILL `run` at a random moment: `early`, at a random time since launch (model loading,
    store creation, first shard); otherwise after 0-2 more shards finish, plus up to 1.5 shard times
    (mid-shard, mid-write, between shards). Returns where it landed, or None when the run finished
    first."""
    if early:
        deadline = time.monotonic() + rng.uniform(0, timing.startup + timing.shard)
        _wait(run, lambda: time.monotonic() >= deadline)
        phase = "early (loading, creating the store, first shard)"
    else:
        target = len(markers(store)) + rng.randint(0, 2)
        _wait(run, lambda: len(markers(store)) >= target)
        deadline = time.monotonic() + rng.uniform(0, 1.5 * timing.shard)
        _wait(run, lambda: time.monotonic() >= deadline)
        phase = "while shards were computed and written"
    if run.poll() is not None:
        return None
    run.kill()
    return phase if (store / "zarr.json").exists() else "before the store existed"


@dataclass(frozen=True)
class _Case:
    """What the trials of one fault case share: the runner, a clean run's output to compare with,
    the tally."""

    runner: Runner
    reference: Path
    outcome: Outcome


@dataclass
class _Kill:
    lost: bool
    wrong: bool


def _kill_round(
    case: _Case, argv: list[str], store: Path, kills: int, rng: random.Random, timing: Timing
) -> list[_Kill]:
    """Kill-and-rerun on one store until `kills` kills landed or the store is complete; returns each
    kill's checks."""
    runner, reference, outcome = case.runner, case.reference, case.outcome
    records: list[_Kill] = []
    while len(records) < kills:
        before = markers(store)
        run = runner.start(argv, store.parent / f"{store.name}-{len(records)}.log")
        phase = kill_at_random(
            run, store, rng, timing, early=(outcome.trials + len(records)) % 5 == 2
        )
        if phase is None:
            break
        after = markers(store)
        lost = any(after.get(name) != inode for name, inode in before.items())
        wrong = done_but_wrong(store, reference)
        if wrong:
            outcome.note(f"after a kill ({phase}), marked done but wrong: {wrong[:3]}")
        if lost:
            outcome.note("a kill lost or rewrote a shard that was already marked done")
        outcome.where[phase] += 1
        records.append(_Kill(lost, bool(wrong)))
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
    command runs to the end and the store must equal an uninterrupted run's, file for file and byte
    for byte."""
    outcome = Outcome(f"SIGKILL during qks extract (shard size {shard_size})")
    # a runner's first run can start slower
    reference, warm = work / "reference.zarr", work / "warm-up.zarr"
    timed_extract(runner, extract_argv(data, clip, warm, shard_size), warm, work / "warm-up.log")
    timing = timed_extract(
        runner, extract_argv(data, clip, reference, shard_size), reference, work / "reference.log"
    )
    rng, round_no = random.Random(seed), 0
    while outcome.trials < kills:
        store = work / f"round{round_no}.zarr"
        argv = extract_argv(data, clip, store, shard_size)
        records = _kill_round(
            _Case(runner, reference, outcome), argv, store, kills - outcome.trials, rng, timing
        )
        final = runner.run(argv, work / f"round{round_no}-final.log")
        diff = compare_trees(store, reference)
        if final.status != 0 or not diff.equal:
            outcome.note(
                f"round {round_no}: final run exit {final.status}, store vs clean run: {diff.summary()}"
            )
        outcome.litter_left(diff.litter, "killed writes in the store")
        for r in records:
            outcome.add(lost=r.lost or final.status != 0, wrong=r.wrong or not diff.equal)
        round_no = outcome.rounds = round_no + 1
    return outcome


# -------------------------------------------------------------------------------------------- kill during training
TRAIN_PARAMS = {
    "model": {"num_queries": 4, "num_layers": 2, "num_heads": 4, "ff_dim": 64},
    "train": dict(
        epochs=6,
        batch_size=16,
        lr=1e-3,
        val_fraction=0.25,
        scheduler="plateau",
        early_stop=0,
        seed=0,
    ),
    "evaluate": {"batch_size": 64},
}
# train_log.csv columns that measure time: legitimately differ
TIMING_COLUMNS = ("time_s", "samples_per_s")


@dataclass(frozen=True)
class TrainSetup:
    train: Path  # training store
    labels: Path  # label-embedding store
    params: Path  # params.yaml


def make_train_setup(work: Path, num_train: int = 384, epochs: int = 6) -> TrainSetup:
    """Synthetic caches (qks_pipeline/store/synthetic.py) and a params file for a tiny Q-Former."""
    import yaml

    data = make_synthetic(work / "caches", num_train=num_train, num_test=32, invalid_train=(3, 77))
    params = json.loads(json.dumps(TRAIN_PARAMS))
    params["train"]["epochs"] = epochs
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return TrainSetup(data.train, data.labels, work / "params.yaml")


def train_argv(setup: TrainSetup, out: Path) -> list[str]:
    return train_args(setup.train, setup.labels, out, setup.params)


def log_rows(out: Path) -> list[dict[str, str]]:
    path = out / "train_log.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def compare_runs(out: Path, reference: Path) -> list[str]:
    """How a training output directory differs from a clean run's: weights and config byte for byte,
    the log without its timing columns. Empty when equal."""
    names = ("best.safetensors", "last.safetensors", "config.json")
    problems = [
        n
        for n in names
        if not (out / n).exists() or (out / n).read_bytes() != (reference / n).read_bytes()
    ]
    untimed = [
        [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in log_rows(d)]
        for d in (out, reference)
    ]
    if untimed[0] != untimed[1]:
        problems.append("train_log.csv")
    return problems


def checkpoint_problems(out: Path, epochs: int) -> list[str]:
    """Files of a training directory that exist but do not load, or a resume point beyond the run's
    epochs."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for name in ("best.safetensors", "last.safetensors"):
        if (out / name).exists():
            try:
                load_file(out / name)
            except Exception as e:
                problems.append(f"{name}: {type(e).__name__}")
    if (out / "last_state.pt").exists():
        try:
            epoch = torch.load(out / "last_state.pt", weights_only=True)["progress"]["epoch"]
            problems += [f"last_state.pt at epoch {epoch} > {epochs}"] if epoch > epochs else []
        except Exception as e:
            problems.append(f"last_state.pt: {type(e).__name__}")
    return problems


def _resume_epoch(out: Path) -> int:
    import torch

    state = out / "last_state.pt"
    return torch.load(state, weights_only=True)["progress"]["epoch"] if state.exists() else 0


def timed_train(runner: Runner, argv: list[str], out: Path) -> float:
    """Run training to the end; returns seconds per epoch (after start-up)."""
    start, first = time.monotonic(), None
    run = runner.start(argv, out.parent / f"{out.name}.log")
    while run.poll() is None:
        if first is None and log_rows(out):
            first = time.monotonic()
        time.sleep(0.005)
    assert run.status == 0, f"reference training failed: {last_line(run.output)}"
    epochs = len(log_rows(out))
    return (time.monotonic() - (first or start)) / max(epochs - 1, 1)


def _kill_training(run: Run, out: Path, rng: random.Random, epoch_s: float) -> bool:
    """SIGKILL after 0-1 more epochs plus a random fraction of an epoch (mid-epoch or
    mid-checkpoint)."""
    target = len(log_rows(out)) + rng.randint(0, 1)
    _wait(run, lambda: len(log_rows(out)) >= target)
    deadline = time.monotonic() + rng.uniform(0, epoch_s)
    _wait(run, lambda: time.monotonic() >= deadline)
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
    rng, round_no = random.Random(seed), 0
    while outcome.trials < kills:
        out = work / f"round{round_no}"
        argv, records = train_argv(setup, out), []
        while outcome.trials + len(records) < kills:
            before = _resume_epoch(out)
            if not _kill_training(
                runner.start(argv, work / f"round{round_no}-{len(records)}.log"), out, rng, epoch_s
            ):
                break
            broken = checkpoint_problems(out, epochs)
            lost = _resume_epoch(out) < before
            outcome.where[f"in epoch {_resume_epoch(out) + 1}"] += 1
            if broken:
                outcome.note(f"broken checkpoint files after a kill: {broken}")
            records.append(_Kill(lost, bool(broken)))
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


# ------------------------------------------------------------------------------------------------------ disk full
class Unavailable(Exception):
    """A fault that cannot be injected here (e.g. mounting a tmpfs is not permitted)."""


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """Mount a tmpfs of `size` bytes on `path` (needs root); unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        done = subprocess.run(mount, capture_output=True, text=True)
    except OSError as e:  # no mount(8) here
        raise Unavailable(f"cannot mount a tmpfs: {e}") from None
    if done.returncode != 0:
        raise Unavailable(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_to(path: Path, free: int) -> Path:
    """Write a filler file so that about `free` bytes stay available on `path`'s filesystem."""
    filler = path / "filler"
    size = max(free_bytes(path) - free, 0)
    with open(filler, "wb") as f:
        f.write(b"\0" * size)
    return filler


def measured_need(runner: Runner, mount: Path, argv: list[str], log: Path) -> int:
    """Bytes a clean run of `argv` takes on the (empty) filesystem at `mount`, measured by running
    it there."""
    before = free_bytes(mount)
    run = runner.run(argv, log)
    assert run.status == 0, f"clean run failed: {last_line(run.output)}"
    need = before - free_bytes(mount)
    _clear(mount)
    return need


def _clear(mount: Path) -> None:
    for p in mount.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def store_state(store: Path) -> str:
    """'absent', 'ok' (verifies), 'incomplete' (a clear QKSError or verify problems), or 'crashes:
    <exception>'."""
    from qks_pipeline.errors import QKSError
    from qks_pipeline.store.features import open_cache
    from qks_pipeline.store.verify import verify_cache

    if not store.exists():
        return "absent"
    try:
        return "incomplete" if verify_cache(open_cache(store)) else "ok"
    except QKSError:
        return "incomplete"
    except Exception as e:
        return f"crashes: {type(e).__name__} {str(e)[:60]}"


def _store_passes_as_complete(store: Path) -> bool:
    return store_state(store) == "ok"


def _extraction_trial(
    case: _Case, mount: Path, argv: list[str], store: Path, free: int, fsize: int | None
) -> None:
    """One disk-full extraction: fail with `free` bytes left (or per-file limit `fsize`), check,
    free up, rerun."""
    runner, reference, outcome = case.runner, case.reference, case.outcome
    filler = fill_to(mount, free) if fsize is None else None
    run = runner.run(argv, mount.parent / "diskfull.log", fsize=fsize)
    unclear = run.status != 0 and bool(error_problems(run.output, store.name))
    if unclear:
        outcome.note(
            f"error output: {error_problems(run.output, store.name)}; last line: {last_line(run.output)}"
        )
    wrong = bool(done_but_wrong(store, reference)) or (
        run.status != 0
        and _store_passes_as_complete(store)
        and not compare_trees(store, reference).equal
    )
    if filler is not None:
        filler.unlink()
    rerun = runner.run(argv, mount.parent / "rerun.log")
    diff = compare_trees(store, reference)
    if rerun.status != 0 or not diff.equal:
        outcome.note(f"rerun with space: exit {rerun.status}, vs clean run: {diff.summary()}")
    outcome.litter_left(diff.litter, "failed writes")
    if run.status == 0:
        outcome.note("a trial had enough space (no failure injected)")
    outcome.add(
        lost=rerun.status != 0, wrong=wrong or not diff.equal, unclear=unclear, ok=run.status != 0
    )
    _clear(mount)


def spread(trials: int, seed: int = 0) -> list[float]:
    """`trials` fractions of the space a run needs, one at random in each of `trials` equal slices
    of (0, 1)."""
    rng = random.Random(seed)
    return [(i + rng.random()) / trials for i in range(trials)]


def disk_full_extraction(
    runner: Runner, work: Path, data: ImageData, clip: TinyClip, fractions: list[float]
) -> Outcome:
    """`qks extract` into a small tmpfs filled so that only `fraction` of the space the run needs is
    free: the disk runs out at a different point in each trial (store creation, a token shard, a
    done marker)."""
    outcome = Outcome("disk full (ENOSPC, tmpfs) during qks extract")
    reference = work / "reference.zarr"
    runner.run(extract_argv(data, clip, reference, 4), work / "reference.log")
    with tmpfs(work / "mnt", 8 << 20) as mount:
        store = mount / "train.zarr"
        argv = extract_argv(data, clip, store, 4)
        need = measured_need(runner, mount, argv, work / "measure.log")
        for fraction in fractions:
            _extraction_trial(
                _Case(runner, reference, outcome), mount, argv, store, int(need * fraction), None
            )
    return outcome


def file_size_limit_extraction(
    runner: Runner, work: Path, data: ImageData, clip: TinyClip
) -> Outcome:
    """`qks extract` under RLIMIT_FSIZE (SIGXFSZ ignored): the first token shard over the limit
    fails with EFBIG. Shards of 16 images (35 kB) and a limit of 3/4 of one: every other file, the
    log included, stays under it."""
    outcome = Outcome("file size limit (EFBIG) during qks extract")
    reference = work / "reference.zarr"
    runner.run(extract_argv(data, clip, reference, 16), work / "reference.log")
    limit = 3 * (reference / "tokens/c/0/0/0/0").stat().st_size // 4
    mount = work / "fsize"
    mount.mkdir()
    argv = extract_argv(data, clip, mount / "train.zarr", 16)
    _extraction_trial(
        _Case(runner, reference, outcome), mount, argv, mount / "train.zarr", 0, limit
    )
    return outcome


def _checkpoint_trial(case: _Case, mount: Path, setup: TrainSetup, free: int, epochs: int) -> None:
    runner, reference, outcome = case.runner, case.reference, case.outcome
    out = mount / "run"
    filler = fill_to(mount, free)
    run = runner.run(train_argv(setup, out), mount.parent / "train-diskfull.log")
    unclear = run.status != 0 and bool(error_problems(run.output, out.name))
    if unclear:
        outcome.note(
            f"error output: {error_problems(run.output, out.name)}; last line: {last_line(run.output)}"
        )
    broken = checkpoint_problems(out, epochs)
    if broken:
        outcome.note(f"checkpoint files broken by the failed write: {broken}")
    outcome.litter_left(
        [p.name for p in out.glob(".*tmp*")] if out.exists() else [], "failed checkpoint writes"
    )
    filler.unlink()
    rerun = runner.run(train_argv(setup, out), mount.parent / "train-rerun.log")
    diff = (
        compare_runs(out, reference)
        if rerun.status == 0
        else [f"rerun failed: {last_line(rerun.output)}"]
    )
    if diff:
        outcome.note(f"rerun with space vs clean run: {diff}")
    if run.status == 0:
        outcome.note("a trial had enough space (no failure injected)")
    outcome.add(
        lost=rerun.status != 0,
        wrong=bool(broken) or bool(diff),
        unclear=unclear,
        ok=run.status != 0,
    )
    _clear(mount)


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096


def state_write_failure(reference: Path) -> int:
    """Free bytes with which the first epoch's best weights and config.json fit, and its
    last_state.pt does not."""
    return (
        _pages(reference / "best.safetensors")
        + _pages(reference / "config.json")
        + (reference / "last_state.pt").stat().st_size // 2
    )


def disk_full_checkpoint(
    runner: Runner,
    work: Path,
    setup: TrainSetup,
    epochs: int,
    fractions: list[float],
    state_write: bool = False,
) -> Outcome:
    """`qks train --out` on a small tmpfs with only `fraction` of the space the run needs free, so a
    checkpoint write fails at a different epoch and file in each trial (`state_write`: one more
    trial that fails exactly in the first last_state.pt write); the rerun with space resumes and
    equals a clean run."""
    outcome = Outcome("disk full (ENOSPC, tmpfs) during checkpoint writes")
    reference = work / "reference"
    runner.run(train_argv(setup, reference), work / "reference.log")
    with tmpfs(work / "mnt", 8 << 20) as mount:
        need = measured_need(runner, mount, train_argv(setup, mount / "run"), work / "measure.log")
        frees = [int(need * f) for f in fractions] + (
            [state_write_failure(reference)] if state_write else []
        )
        for free in frees:
            _checkpoint_trial(_Case(runner, reference, outcome), mount, setup, free, epochs)
    return outcome


# ----------------------------------------------------------------------------------------- two extractions at once
LOCK_WORDS = ("another extraction", "lock")  # what a refusal of a second writer should say


def _pair_trial(
    case: _Case, work: Path, argv: list[str], store: Path, i: int, barrier: bool
) -> None:
    runner, reference, outcome = case.runner, case.reference, case.outcome
    gate = work / f"pair{i}.barrier" if barrier else None
    runs = [runner.start(argv, work / f"pair{i}-{name}.log", barrier=gate) for name in "ab"]
    for run in runs:
        run.wait()
    failed = [run for run in runs if run.status != 0]
    unclear = any(error_problems(run.output) for run in failed)
    refused_cleanly = all(any(w in last_line(r.output) for w in LOCK_WORDS) for r in failed)
    for run in failed:
        outcome.note(f"exit {run.status}: {last_line(run.output)[:160]}")
    complete, diff = _store_passes_as_complete(store), compare_trees(store, reference)
    if store_state(store).startswith("crashes"):
        outcome.note(
            f"left a store that `qks cache verify` cannot open without a traceback ({store_state(store)})"
        )
    lost = len(failed) < 2 and not complete  # a run said it finished, yet the store is not complete
    if not diff.equal:
        outcome.note(f"store vs a single run: {diff.summary()}")
    if failed and not refused_cleanly:
        outcome.note("a run failed without saying another extraction holds the store")
    stuck = False
    if not diff.equal:  # can a plain rerun finish the job, or is the store broken for good?
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
    it does not, one plain rerun shows whether the store left behind can still be completed; a store
    no rerun can complete counts as data lost."""
    outcome = Outcome(
        "two qks extract on one store at once" + (" (creation together)" if barrier else "")
    )
    reference = work / "reference.zarr"
    runner.run(extract_argv(data, clip, reference, 2), work / "reference.log")
    for i in range(trials):
        store = work / f"pair{i}.zarr"
        _pair_trial(
            _Case(runner, reference, outcome),
            work,
            extract_argv(data, clip, store, 2),
            store,
            i,
            barrier,
        )
    return outcome


def create_while_creating(runner: Runner, work: Path, data: ImageData, clip: TinyClip) -> Outcome:
    """A deterministic interleaving of two extractions with the same settings on a new store: the
    first is paused just before it puts its freshly built store in place (`hold_replace`); the
    second starts and runs; then the first goes on. With a lock the second refuses at once (or
    waits) and the first finishes; the store must then equal a single run's, and no run may report
    success for a store that is not there."""
    outcome = Outcome("second extraction while the first creates the store")
    reference, store, gate = work / "reference.zarr", work / "shared.zarr", work / "gate"
    runner.run(extract_argv(data, clip, reference, 4), work / "reference.log")
    first = runner.start(extract_argv(data, clip, store, 4), work / "first.log", hold_replace=gate)
    _wait(first, lambda: Path(f"{gate}.held").exists())
    if not Path(f"{gate}.held").exists():
        first.kill()
        raise RuntimeError(f"the first run never reached store creation: {last_line(first.output)}")
    second = runner.start(extract_argv(data, clip, store, 4), work / "second.log")
    # a lock that waits instead of refusing: go on after 30 s
    _wait(second, lambda: False, timeout=30)
    Path(f"{gate}.go").touch()
    first.wait()
    second.wait()
    runs = (first, second)
    diff, complete = compare_trees(store, reference), _store_passes_as_complete(store)
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
    starts mid-run). Safe outcomes: the second refuses (a lock), or the final store equals the clean
    store of the weights its fingerprint names."""
    outcome = Outcome("second extraction (other weights) while one runs")
    refs, shard_size = {}, 4
    for c, name in ((clip, "ref_a.zarr"), (other, "ref_b.zarr")):
        runner.run(extract_argv(data, c, work / name, shard_size), work / f"{name}.log")
        refs[store_backbone_sha(work / name)] = work / name
    store = work / "shared.zarr"
    first = runner.start(
        extract_argv(data, clip, store, shard_size), work / "first.log", slow_write=0.7
    )
    _wait(first, lambda: len(markers(store)) >= 1)
    second = runner.run(
        [*extract_argv(data, other, store, shard_size), "--replace-stale"], work / "second.log"
    )
    first.wait()
    claimed = refs.get(store_backbone_sha(store)) if (store / "zarr.json").exists() else None
    diff = compare_trees(store, claimed) if claimed else None
    refused = second.status != 0 and any(w in last_line(second.output) for w in LOCK_WORDS)
    complete = _store_passes_as_complete(store)
    outcome.note(
        f"first exit {first.status}, second exit {second.status}: {last_line(second.output)[:120]}"
    )
    if diff is not None and not diff.equal:
        outcome.note(
            f"store claims weights {store_backbone_sha(store)[:8]} but differs from their clean store: "
            f"{len(diff.different)} files, e.g. {diff.different[:2]}; cache verify "
            f"{'passes' if complete else 'fails'}"
        )
    wrong = diff is None or not diff.equal
    unclear = any(error_problems(r.output) for r in (first, second) if r.status != 0)
    ok = (refused or second.status == 0) and not wrong
    outcome.add(lost=not complete, wrong=complete and wrong, unclear=unclear, ok=ok)
    return outcome


# ---------------------------------------------------------------------------------------------------- stale caches
@dataclass(frozen=True)
class StaleSetup:
    """Caches built with weights A (train, test, labels, a trained checkpoint) and with other
    inputs."""

    data: ImageData
    clip: TinyClip  # weights A
    other: TinyClip  # weights B, same config
    wide: TinyClip  # another config under the same model name
    train_a: Path
    test_a: Path
    labels_a: Path
    run_a: Path  # `qks train` output on train_a + labels_a
    train_b: Path
    test_b: Path
    labels_b: Path
    labels_vocab: Path  # weights A, another vocabulary
    params: Path
    work: Path


def cli(*args: object) -> tuple[int, str, BaseException | None]:
    """Run `qks ARGS` in this process: (exit code, output, an exception that escaped click, if any)."""
    from click.testing import CliRunner

    from qks_pipeline.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    escaped = (
        None
        if result.exception is None or isinstance(result.exception, SystemExit)
        else result.exception
    )
    return result.exit_code, result.output, escaped


def _ok(*args: object) -> None:
    code, output, escaped = cli(*args)
    assert code == 0 and escaped is None, output


def _embed(data: ImageData, clip: TinyClip, out: Path, templates: Path) -> Path:
    _ok(*embed_args(SimpleNamespace(dataset=data.dataset, templates=templates), clip, out))
    return out


def wide_config(work: Path) -> Path:
    """The tiny config with one more vision layer, saved under the same file name (so the same model
    name)."""
    config = json.loads(TINY_CONFIG.read_text())
    config["vision_cfg"]["layers"] = 3
    path = work / "wide" / TINY_CONFIG.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def make_stale_setup(work: Path, data: ImageData, clip: TinyClip, other: TinyClip) -> StaleSetup:
    """Extract, embed and train (1 epoch) in this process; about 10 s with the tiny model."""
    import yaml

    templates = work / "templates.txt"
    templates.write_text("a photo of a {}.\nthere is a {} in the scene.\n")
    stores = {}  # train_a, test_a, train_b, test_b
    for weights, c in (("a", clip), ("b", other)):
        for split in ("train", "test"):
            store = stores[f"{split}_{weights}"] = work / f"{split}_{weights}.zarr"
            _ok(*extract_argv(data, c, store, 4, split))
    vocab = ImageData(work / "vocab", data.images)
    shutil.copytree(data.dataset, vocab.dataset)
    (vocab.dataset / "unseen.txt").write_text("yellow\ntriangle\nhexagon\n")
    params = work / "params.yaml"
    train = dict(TRAIN_PARAMS["train"], epochs=1, batch_size=8)
    params.write_text(
        yaml.safe_dump({**TRAIN_PARAMS, "model": dict(TRAIN_PARAMS["model"]), "train": train})
    )
    setup = StaleSetup(
        data=data,
        clip=clip,
        other=other,
        wide=make_tiny_clip(work / "wide", config=wide_config(work)),
        labels_a=_embed(data, clip, work / "labels_a.zarr", templates),
        labels_b=_embed(data, other, work / "labels_b.zarr", templates),
        labels_vocab=_embed(vocab, clip, work / "labels_v.zarr", templates),
        run_a=work / "run_a",
        params=params,
        work=work,
        **stores,
    )
    _ok(*train_args(setup.train_a, setup.labels_a, setup.run_a, params))
    return setup


@dataclass(frozen=True)
class StaleCase:
    name: str
    argv: list[str]
    field: str  # what the refusal must name
    guarded: tuple[Path, ...]  # stores or directories that the refusal must leave unchanged


FUTURE_VERSION = 99  # a store format this code does not know


def _copy_with_version(store: Path, out: Path, version: int) -> Path:
    shutil.copytree(store, out, dirs_exist_ok=True)
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["fingerprint"]["format_version"] = version
    (out / "zarr.json").write_text(json.dumps(meta))
    return out


def _other_manifest(s: StaleSetup) -> ImageData:
    other = ImageData(s.work / "manifest2", s.data.images)
    shutil.copytree(s.data.dataset, other.dataset, dirs_exist_ok=True)
    lines = (other.dataset / "train.jsonl").read_text().splitlines()
    (other.dataset / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one image fewer
    return other


def stale_cases(s: StaleSetup) -> list[StaleCase]:
    """Train, evaluate and extract, each given an input built differently from what it is combined
    with."""

    def train(cache: Path, labels: Path, out: Path, *extra: object) -> list[str]:
        return train_args(cache, labels, out, s.params, *extra)

    def evaluate(test: Path, labels: Path) -> list[str]:
        args = ["evaluate", "--checkpoint", s.run_a, "--test-cache", test, "--labels", labels]
        return [str(a) for a in [*args, "--out", s.work / "metrics.json", "--device", "cpu"]]

    future_train = _copy_with_version(s.train_a, s.work / "future_train.zarr", FUTURE_VERSION)
    future_test = _copy_with_version(s.test_a, s.work / "future_test.zarr", FUTURE_VERSION)
    future_labels = _copy_with_version(s.labels_a, s.work / "future_labels.zarr", FUTURE_VERSION)
    resumed = s.work / "run_a_resumed"
    shutil.copytree(s.run_a, resumed, dirs_exist_ok=True)
    w = "weights_sha256"
    return [
        StaleCase(
            "train: label embeddings of other weights",
            train(s.train_a, s.labels_b, s.work / "t1"),
            w,
            (),
        ),
        StaleCase(
            "train: test cache of other weights",
            train(s.train_a, s.labels_a, s.work / "t2", "--test-cache", s.test_b),
            w,
            (),
        ),
        StaleCase(
            "train: resume a run of other weights",
            train(s.train_b, s.labels_b, resumed),
            "fingerprint",
            (resumed,),
        ),
        StaleCase(
            "train: cache of a future format version",
            train(future_train, s.labels_a, s.work / "t3"),
            "format version",
            (),
        ),
        StaleCase(
            "train: labels of a future format version",
            train(s.train_a, future_labels, s.work / "t4"),
            "format version",
            (),
        ),
        StaleCase(
            "evaluate: checkpoint vs test cache of other weights",
            evaluate(s.test_b, s.labels_b),
            w,
            (),
        ),
        StaleCase(
            "evaluate: label embeddings of other weights", evaluate(s.test_a, s.labels_b), w, ()
        ),
        StaleCase(
            "evaluate: label embeddings of another vocabulary",
            evaluate(s.test_a, s.labels_vocab),
            "label 7 is 'hexagon'",
            (),
        ),
        StaleCase(
            "evaluate: test cache of a future format version",
            evaluate(future_test, s.labels_a),
            "format version",
            (),
        ),
        StaleCase(
            "extract: store of other weights",
            extract_argv(s.data, s.other, s.train_a, 4),
            w,
            (s.train_a,),
        ),
        StaleCase(
            "extract: store of another manifest",
            extract_argv(_other_manifest(s), s.clip, s.train_a, 4),
            "manifest_sha256",
            (s.train_a,),
        ),
        StaleCase(
            "extract: store of another model config",
            extract_argv(s.data, s.wide, s.train_a, 4),
            "model_config_sha256",
            (s.train_a,),
        ),
        StaleCase(
            "extract: store of a future format version",
            extract_argv(s.data, s.clip, future_train, 4),
            "format version",
            (future_train,),
        ),
    ]


def run_stale_case(case: StaleCase) -> tuple[bool, bool, list[str], str]:
    """(refused, unchanged, problems with the message, the error line)."""
    before = [store_files(p) for p in case.guarded]
    code, output, escaped = cli(*case.argv)
    problems = error_problems(output) + ([f"escaped {type(escaped).__name__}"] if escaped else [])
    line = next(
        (x for x in reversed(output.splitlines()) if x.startswith("Error: ")), last_line(output)
    )
    if case.field not in line:
        problems.append(f"the error does not name {case.field!r}")
    unchanged = before == [store_files(p) for p in case.guarded]
    return code == 1, unchanged, problems, line


def stale_inputs(setup: StaleSetup) -> Outcome:
    """Every stale combination must be refused with one line naming the difference, changing
    nothing."""
    outcome = Outcome("stale cache (backbone, manifest, format version)")
    for case in stale_cases(setup):
        refused, unchanged, problems, line = run_stale_case(case)
        if problems or not refused or not unchanged:
            outcome.note(
                f"{case.name}: refused {refused}, unchanged {unchanged}, {problems}: {line[:160]}"
            )
        outcome.add(lost=not unchanged, wrong=not refused, unclear=bool(problems), ok=not problems)
    return outcome
