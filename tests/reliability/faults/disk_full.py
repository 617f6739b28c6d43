"""A full disk (ENOSPC, a small tmpfs filled up) or a file-size limit (EFBIG, RLIMIT_FSIZE) during
extraction and during checkpoint writes; each trial is followed by a rerun with space, which must
end equal to a clean run."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.reliability.faults.outcome import Case, Outcome, Unavailable
from tests.reliability.faults.training import (
    TrainSetup,
    checkpoint_problems,
    compare_runs,
    train_argv,
)
from tests.reliability.harness import (
    ImageData,
    Runner,
    compare_trees,
    done_but_wrong,
    error_problems,
    extract_argv,
    last_line,
    passes_as_complete,
)
from tests.tiny import TinyClip


# --------------------------------------------------------------------------------- filling the disk
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
    """Bytes a clean run of `argv` takes on the empty filesystem at `mount`, measured there."""
    before = free_bytes(mount)
    run = runner.run(argv, log)
    assert run.status == 0, f"clean run failed: {last_line(run.output)}"
    need = before - free_bytes(mount)
    _clear(mount)
    return need


def _clear(mount: Path) -> None:
    for p in mount.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def spread(trials: int, seed: int = 0) -> list[float]:
    """`trials` fractions of a run's space: one at random in each of `trials` slices of (0, 1)."""
    rng = random.Random(seed)
    return [(i + rng.random()) / trials for i in range(trials)]


# -------------------------------------------------------------------------------- during extraction
def _extraction_trial(
    case: Case, mount: Path, argv: list[str], store: Path, free: int, fsize: int | None
) -> None:
    """One trial: fail with `free` bytes left (or `fsize` a file), check, free up, rerun."""
    runner = case.runner
    reference = case.reference
    outcome = case.outcome
    filler = fill_to(mount, free) if fsize is None else None
    run = runner.run(argv, mount.parent / "diskfull.log", fsize=fsize)
    unclear = run.status != 0 and bool(error_problems(run.output, store.name))
    if unclear:
        outcome.note(
            f"error output: {error_problems(run.output, store.name)}; "
            f"last line: {last_line(run.output)}"
        )
    wrong = bool(done_but_wrong(store, reference)) or (
        run.status != 0 and passes_as_complete(store) and not compare_trees(store, reference).equal
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


def disk_full_extraction(
    runner: Runner, work: Path, data: ImageData, clip: TinyClip, fractions: list[float]
) -> Outcome:
    """`qks extract` into a small tmpfs filled so that only `fraction` of the space the run needs
    is free: the disk runs out at a different point in each trial (store creation, a token shard, a
    done marker)."""
    outcome = Outcome("disk full (ENOSPC, tmpfs) during qks extract")
    reference = work / "reference.zarr"
    runner.run(extract_argv(data, clip, reference, 4), work / "reference.log")
    with tmpfs(work / "mnt", 8 << 20) as mount:
        store = mount / "train.zarr"
        argv = extract_argv(data, clip, store, 4)
        need = measured_need(runner, mount, argv, work / "measure.log")
        case = Case(runner, reference, outcome)
        for fraction in fractions:
            _extraction_trial(case, mount, argv, store, int(need * fraction), None)
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
    store = mount / "train.zarr"
    argv = extract_argv(data, clip, store, 16)
    _extraction_trial(Case(runner, reference, outcome), mount, argv, store, 0, limit)
    return outcome


# ------------------------------------------------------------------------- during checkpoint writes
def _checkpoint_trial(case: Case, mount: Path, setup: TrainSetup, free: int, epochs: int) -> None:
    runner = case.runner
    outcome = case.outcome
    out = mount / "run"
    filler = fill_to(mount, free)
    run = runner.run(train_argv(setup, out), mount.parent / "train-diskfull.log")
    unclear = run.status != 0 and bool(error_problems(run.output, out.name))
    if unclear:
        outcome.note(
            f"error output: {error_problems(run.output, out.name)}; "
            f"last line: {last_line(run.output)}"
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
        compare_runs(out, case.reference)
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
    """Free bytes for the first epoch's best weights and config.json but not its last_state.pt."""
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
    """`qks train --out` on a small tmpfs with only `fraction` of the space the run needs free, so
    a checkpoint write fails at a different epoch and file in each trial (`state_write`: one more
    trial that fails exactly in the first last_state.pt write); the rerun with space resumes and
    equals a clean run."""
    outcome = Outcome("disk full (ENOSPC, tmpfs) during checkpoint writes")
    reference = work / "reference"
    runner.run(train_argv(setup, reference), work / "reference.log")
    with tmpfs(work / "mnt", 8 << 20) as mount:
        need = measured_need(runner, mount, train_argv(setup, mount / "run"), work / "measure.log")
        frees = [int(need * f) for f in fractions]
        if state_write:
            frees.append(state_write_failure(reference))
        case = Case(runner, reference, outcome)
        for free in frees:
            _checkpoint_trial(case, mount, setup, free, epochs)
    return outcome
