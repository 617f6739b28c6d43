"""A warm process that forks `qks` command runs, so a fault case does not pay ~4.5 s of imports per
run.

Protocol (one JSON object a line on stdin, one answer a line on stdout):
    {"op": "run", "argv": [...], "log": PATH, "fsize": BYTES|null, HOOK: VALUE...}
        -> {"pid": N}
    {"op": "poll", "pid": N}
        -> {"status": CODE|null}
    {"op": "quit"}

Each run is a forked child that executes the same click entry point as the `qks` script
(`qks_pipeline.cli.main`), with stdout and stderr in `log`. `fsize` sets RLIMIT_FSIZE (SIGXFSZ
ignored, so an oversized write fails with EFBIG). An unhandled exception prints its traceback and
exits 1, as the interpreter would. The parent never runs a torch operation, so no thread pool exists
at fork time. A killed child reports -signal.

Hooks (test instrumentation, `instrument`): `slow_write` sleeps after each whole-shard write;
`barrier` holds store creation until two runs reach it; `hold_replace` pauses the last step of store
creation. A hook whose hook point is gone exits INSTRUMENTATION_FAILED, so no test passes or xfails
on a hook that silently stopped applying. `python zygote.py --hooks JSON ARGV...` is one
instrumented run in this process (the harness's "spawn" mode).
"""

from __future__ import annotations

import glob
import json
import os
import resource
import signal
import sys
import time
import traceback

import qks_pipeline.stage_one.extract  # noqa: F401
import qks_pipeline.stage_two.evaluate  # noqa: F401  (heavy imports done once, before any fork)
import qks_pipeline.stage_two.train  # noqa: F401
from qks_pipeline.cli import main

INSTRUMENTATION_FAILED = 99


def slow_shard_writes(seconds: float) -> None:
    """Sleep after every `Cache.write_shard`: widens the time between shards so a test can act while
    a run is busy."""
    from qks_pipeline.store import features as cache

    write = cache.Cache.write_shard

    def slow(self, *args, **kwargs):
        write(self, *args, **kwargs)
        time.sleep(seconds)

    cache.Cache.write_shard = slow


def creation_barrier(path: str, parties: int = 2, timeout: float = 10.0) -> None:
    """Hold `create_cache` until `parties` runs reach it (each touches `path.<pid>`), or `timeout`:
    two extractions started together then create the store at the same moment, as they can by
    chance."""
    from qks_pipeline.stage_one import extract

    create = extract.create_cache

    def gated(*args, **kwargs):
        open(f"{path}.{os.getpid()}", "w").close()
        deadline = time.monotonic() + timeout
        while len(glob.glob(f"{glob.escape(path)}.*")) < parties and time.monotonic() < deadline:
            time.sleep(0.001)
        return create(*args, **kwargs)

    extract.create_cache = gated


def hold_before_replace(gate: str) -> None:
    """Pause the step that puts a newly built store in place (`Location.replace_with`) until
    `gate.go` exists; `gate.held` tells the test the pause began."""
    from qks_pipeline.store import location as storage

    replace = storage.Location.replace_with

    def held(self, built):
        open(f"{gate}.held", "w").close()
        while not os.path.exists(f"{gate}.go"):
            time.sleep(0.005)
        return replace(self, built)

    storage.Location.replace_with = held


HOOKS = {
    "slow_write": slow_shard_writes,
    "barrier": creation_barrier,
    "hold_replace": hold_before_replace,
}


def instrument(req: dict) -> None:
    """Apply the hooks a run asks for; exit INSTRUMENTATION_FAILED when a hook point is gone."""
    try:
        for name, hook in HOOKS.items():
            if req.get(name) is not None:
                hook(req[name])
    except (AttributeError, ImportError) as e:
        print(f"INSTRUMENTATION FAILED: {e!r}", file=sys.stderr, flush=True)
        os._exit(INSTRUMENTATION_FAILED)


def _redirect(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdin = open(os.devnull)


def _child(req: dict) -> None:
    """Runs in the forked child: never returns."""
    code = 1
    try:
        os.setsid()
        _redirect(req["log"])
        instrument(req)
        if req.get("fsize") is not None:
            # an oversized write then fails with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        main(args=req["argv"], prog_name="qks")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _status(pid: int) -> int | None:
    done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        return None
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> None:
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            return
        if req["op"] == "run":
            pid = os.fork()
            if pid == 0:
                _child(req)
            answer = {"pid": pid}
        else:
            answer = {"status": _status(req["pid"])}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hooks"]:
        instrument(json.loads(sys.argv[2]))
        main(args=sys.argv[3:], prog_name="qks")
    else:
        serve()
