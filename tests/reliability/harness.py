"""What the fault cases share: a tiny CLIP and image dataset, `qks` runs in separate processes
(and in this one), store comparison.

Runs are real processes that can be SIGKILLed. Two ways to start them (`Runner`):
- "spawn": a fresh interpreter per run
  (`python -c "from qks_pipeline.cli import main; main()" ...`), exactly what a user's `qks` does;
  about 4.5 s of imports per run on these machines;
- "fork": forked from a warm process that has imported the library (`zygote.py`): the same click
  entry point in a separate process, started in about 0.1 s. The fast suite and the report use it
  to afford many kills.
zygote.py runs as a script (it imports only the library), so no process needs the tests on its
import path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE, STDOUT

import numpy as np

from tests.tiny import SEEN, UNSEEN, TinyClip, extract_args

SPAWN_CODE = "from qks_pipeline.cli import main; main()"
ZYGOTE = Path(__file__).with_name("zygote.py")
INSTRUMENTATION_FAILED = 99  # zygote.INSTRUMENTATION_FAILED
# Files a killed or failed write leaves behind: zarr's `<key>.<uuid>.partial`, our
# `<name>.tmp<pid>`.
LITTER = re.compile(r"(\.[0-9a-f]{32}\.partial|\.tmp\d+)$")


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ImageData:
    dataset: Path  # train.jsonl, test.jsonl, seen.txt, unseen.txt
    images: Path  # image root


def _random_image(rng: np.random.Generator):
    from PIL import Image

    h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
    base = rng.integers(0, 256, 3)
    noise = rng.integers(-40, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _records(rng: np.random.Generator, split: str, n: int, images: Path) -> list[str]:
    lines = []
    for i in range(n):
        rel = f"{split}/img{i:04d}.{'png' if i % 2 else 'jpg'}"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        _random_image(rng).save(images / rel)
        positive = sorted(
            rng.choice(SEEN + UNSEEN, size=int(rng.integers(1, 3)), replace=False).tolist()
        )
        lines.append(json.dumps({"image": rel, "positive": positive, "negative": "*"}))
    return lines


def make_image_data(root: Path, n_train: int, n_test: int = 8, seed: int = 0) -> ImageData:
    """Noise images (JPEG and PNG, varied sizes), fully annotated with the compact negative form."""
    rng = np.random.default_rng(seed)
    data = ImageData(root / "dataset", root / "images")
    data.dataset.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        (data.dataset / f"{split}.jsonl").write_text(
            "\n".join(_records(rng, split, n, data.images)) + "\n"
        )
    (data.dataset / "seen.txt").write_text("\n".join(SEEN) + "\n")
    (data.dataset / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    return data


def extract_argv(
    data: ImageData, clip: TinyClip, out: Path, shard_size: int, split: str = "train"
) -> list[str]:
    """`qks extract` arguments: tiny model, CPU, decoding in the main process, 4 images a batch."""
    return extract_args(data, clip, out, split, batch_size=4, shard_size=shard_size)


# ---------------------------------------------------------------------------------------- processes
@dataclass
class Run:
    """One `qks` process."""

    runner: Runner
    pid: int
    log: Path
    popen: subprocess.Popen | None = None  # spawn mode only
    status: int | None = None  # exit code, or -signal

    def poll(self) -> int | None:
        if self.status is None:
            self.status = self.runner.poll(self)
            if self.status == INSTRUMENTATION_FAILED:
                raise RuntimeError(
                    f"test instrumentation found nothing to hook: {last_line(self.output)}"
                )
        return self.status

    def wait(self, timeout: float = 300.0) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"qks run {self.pid} took over {timeout} s; log: {self.log}")
            time.sleep(0.01)
        return self.status

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_until(run: Run, until: Callable[[], bool], timeout: float = 120.0) -> None:
    """Wait until `until()` holds, `run` has ended, or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while run.poll() is None and not until() and time.monotonic() < deadline:
        time.sleep(0.002)


class Runner:
    """Starts `qks` runs in separate processes, `mode` "fork" (from a warm zygote) or "spawn"."""

    def __init__(self, mode: str = "fork"):
        assert mode in ("fork", "spawn"), mode
        self.mode = mode
        self._zygote: subprocess.Popen | None = None
        self._runs: list[Run] = []  # killed on close if still running (a test that failed half-way)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, request: dict) -> dict:
        if self._zygote is None:
            serve = [sys.executable, str(ZYGOTE)]
            self._zygote = subprocess.Popen(serve, stdin=PIPE, stdout=PIPE, text=True, env=_env())
            json.loads(self._zygote.stdout.readline())  # {"ready": pid}
        self._zygote.stdin.write(json.dumps(request) + "\n")
        self._zygote.stdin.flush()
        return json.loads(self._zygote.stdout.readline())

    def start(self, argv: list[str], log: Path, fsize: int | None = None, **hooks: object) -> Run:
        """Start `qks ARGV` with stdout+stderr in `log`; `fsize`: RLIMIT_FSIZE in bytes (SIGXFSZ
        ignored). `hooks`: test instrumentation (zygote.py): `slow_write` seconds of sleep after
        each whole-shard write, `barrier` a path prefix where two runs meet before creating the
        store, `hold_replace` a gate path that pauses the last step of store creation."""
        log.parent.mkdir(parents=True, exist_ok=True)
        hooks = {k: str(v) if isinstance(v, Path) else v for k, v in hooks.items() if v is not None}
        if self.mode == "fork":
            request = {"op": "run", "argv": argv, "log": str(log), "fsize": fsize, **hooks}
            run = Run(self, self._ask(request)["pid"], log)
        else:
            # instrumented or not
            entry = [str(ZYGOTE), "--hooks", json.dumps(hooks)] if hooks else ["-c", SPAWN_CODE]
            command = [sys.executable, *entry, *argv]
            with open(log, "w") as f:
                popen = subprocess.Popen(
                    command, stdout=f, stderr=STDOUT, env=_env(), preexec_fn=_limit_fsize(fsize)
                )
            run = Run(self, popen.pid, log, popen)
        self._runs = [r for r in self._runs if r.status is None] + [run]
        return run

    def poll(self, run: Run) -> int | None:
        if run.popen is not None:
            return run.popen.poll()
        return self._ask({"op": "poll", "pid": run.pid})["status"]

    def run(
        self, argv: list[str], log: Path, fsize: int | None = None, timeout: float = 300.0
    ) -> Run:
        """Start and wait."""
        run = self.start(argv, log, fsize)
        run.wait(timeout)
        return run

    def close(self) -> None:
        for run in self._runs:
            if run.status is None:
                with contextlib.suppress(Exception):
                    run.kill()
        if self._zygote is not None:
            self._zygote.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self._zygote.stdin.close()
            self._zygote.wait(timeout=30)
            self._zygote = None


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONUNBUFFERED": "1"}


def _limit_fsize(fsize: int | None):
    if fsize is None:
        return None

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return limit


# -------------------------------------------------------------------------------------- error lines
def error_problems(output: str, path_hint: str | None = None) -> list[str]:
    """What is wrong with a failed command's output as a user-facing error: a traceback, no `Error:`
    line, or an error line that does not name `path_hint`. Empty when the output ends in one clear
    line."""
    problems = []
    if "Traceback (most recent call last)" in output:
        problems.append("traceback")
    errors = [line for line in re.split(r"[\r\n]", output) if line.startswith("Error: ")]
    if not errors:
        problems.append("no 'Error:' line")
    elif path_hint is not None and path_hint not in errors[-1]:
        problems.append(f"error line does not name {path_hint}")
    return problems


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def cli(*args: object) -> tuple[int, str, BaseException | None]:
    """Run `qks ARGS` here: (exit code, output, an exception that escaped click or None)."""
    from click.testing import CliRunner

    from qks_pipeline.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    escaped = (
        None
        if result.exception is None or isinstance(result.exception, SystemExit)
        else result.exception
    )
    return result.exit_code, result.output, escaped


# --------------------------------------------------------------------------------------- comparison
def store_files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@dataclass
class TreeDiff:
    """How a directory differs from a reference directory."""

    missing: list[str] = field(default_factory=list)  # in the reference, not here
    different: list[str] = field(default_factory=list)  # both, other bytes
    extra: list[str] = field(default_factory=list)  # here, not in the reference, and not litter
    litter: list[str] = field(default_factory=list)  # temporary files of killed or failed writes

    @property
    def equal(self) -> bool:
        """Byte-for-byte equal, litter aside."""
        return not (self.missing or self.different or self.extra)

    def summary(self) -> str:
        parts = [
            f"{k} {getattr(self, k)[:4]}"
            for k in ("missing", "different", "extra", "litter")
            if getattr(self, k)
        ]
        return "; ".join(parts) or "equal"


def compare_trees(root: Path, reference: Path, skip: tuple[str, ...] = ()) -> TreeDiff:
    """Compare each file under `root` with the same path under `reference`, but those in `skip`."""
    here, ref = store_files(root), store_files(reference)
    diff = TreeDiff()
    for name in sorted(set(here) | set(ref)):
        if name in skip:
            continue
        if name not in here:
            diff.missing.append(name)
        elif name not in ref:
            (diff.litter if LITTER.search(name) else diff.extra).append(name)
        elif here[name] != ref[name]:
            diff.different.append(name)
    return diff


def shard_keys(shard: int) -> list[str]:
    """One shard's files in a store of `qks extract`: done marker, token shard, valid chunk."""
    return [f"done/{shard:05d}.json", f"tokens/c/{shard}/0/0/0", f"valid/c/{shard}"]


def markers(store: Path) -> dict[str, int]:
    """Done markers of a store: name -> inode (a rewritten marker gets a new inode)."""
    done = store / "done"
    return {p.name: p.stat().st_ino for p in done.glob("*.json")} if done.is_dir() else {}


def done_but_wrong(store: Path, reference: Path) -> list[str]:
    """Whatever passes as finished in `store` yet differs from `reference`: metadata of an existing
    store, and the files of every shard that has a done marker. Empty when everything marked done is
    right."""
    if not (store / "zarr.json").exists():
        return []
    here = store_files(store)
    ref = store_files(reference)
    meta = [k for k in ref if not k.startswith(("tokens/c/", "valid/c/", "done/"))]
    wrong = [k for k in meta if here.get(k) != ref[k]]
    for name in markers(store):
        wrong += [k for k in shard_keys(int(name.split(".")[0])) if here.get(k) != ref.get(k)]
    return wrong


def store_state(store: Path) -> str:
    """'absent', 'ok' (verifies), 'incomplete' (QKSError or verify problems), or 'crashes: ...'."""
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


def passes_as_complete(store: Path) -> bool:
    return store_state(store) == "ok"
