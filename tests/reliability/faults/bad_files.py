"""Bad files where weights belong: empty, random bytes, truncated, a pickle whose unpickling would
run code (raw, and inside a torch.save archive), given to every command that reads weights:
`import-checkpoint`, backbone weights (`extract`, `embed-labels`, `predict --pretrained`), the
resume point `last_state.pt` (`train`), `best.safetensors` (`evaluate`, `predict`). Each must be
refused in one line naming the file; code from a pickle running is a wrong result, and so is an
exit 0; the `--trust-pickle` hint belongs to `import-checkpoint`'s pickles only."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

from tests.reliability.faults.damage import Pipeline, judge
from tests.reliability.faults.outcome import Outcome
from tests.reliability.harness import cli, extract_argv, last_line
from tests.tiny import embed_args, train_args

KINDS = ("empty", "random bytes", "truncated", "pickle", "torch pickle")
PICKLES = ("pickle", "torch pickle")


class RunsCode:
    """Unpickled, it would create the file `path`: proof that code from a pickle ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def make_bad_file(directory: Path, kind: str, good: Path, suffix: str = ".pt") -> Path:
    """A file of `kind` in `directory` (a truncated one: half of `good`); `directory/code_ran`
    appears if code from it ever runs."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{kind.replace(' ', '_')}{suffix}"
    marker = directory / "code_ran"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(bytes((i * 167 + 13) % 256 for i in range(4096)))
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": RunsCode(marker)}))
    else:
        torch.save({"weight": torch.zeros(2), "hook": RunsCode(marker)}, path)
    return path


def _trial(outcome: Outcome, what: str, argv: list[object], bad: Path, hint: bool) -> None:
    """Judge one run on a bad file: one line naming it; no code ran; the hint where it applies."""
    code, output, escaped = cli(*argv)
    if (bad.parent / "code_ran").exists():
        outcome.note(f"{what}: code from the pickle ran")
        outcome.add(wrong=True)
        return
    if code and ("--trust-pickle" in last_line(output)) != hint:
        outcome.note(f"{what}: the --trust-pickle hint {'missing' if hint else 'misplaced'}")
        outcome.add(unclear=True, ok=False)
        return
    judge(outcome, what, code, output, escaped, bad)


def _weights_entries(p: Pipeline, work: Path) -> dict[str, object]:
    """Commands given a backbone weights file or an authors' checkpoint: name -> argv(file)."""
    image = next((p.data.images / "test").iterdir())
    templates = p.work / "templates.txt"

    def predict(weights: Path) -> list[object]:
        args = ["predict", "--checkpoint", p.run, "--model", p.clip.config, "--pretrained", weights]
        return [*args, "--labels", "red", "--device", "cpu", image]

    return {
        "import-checkpoint": lambda f: ["import-checkpoint", f, "--out", f.parent / "imported"],
        "extract --pretrained": lambda f: extract_argv(
            p.data, (p.clip.config, f), f.parent / "s.zarr", 4
        ),
        "embed-labels --pretrained": lambda f: embed_args(
            SimpleNamespace(dataset=p.data.dataset, templates=templates),
            (p.clip.config, f),
            f.parent / "l.zarr",
        ),
        "predict --pretrained": predict,
    }


def bad_weights_files(p: Pipeline, work: Path) -> Outcome:
    """Every kind of bad file as backbone weights or as an authors' checkpoint."""
    outcome = Outcome("bad weights files (empty, random, truncated, pickles that run code)")
    for entry, argv in _weights_entries(p, work).items():
        for kind in KINDS:
            where = work / entry.split()[0] / kind.replace(" ", "_")
            bad = make_bad_file(where, kind, p.clip.weights)
            hint = entry == "import-checkpoint" and kind in PICKLES
            _trial(outcome, f"{entry}, {kind}", argv(bad), bad, hint)
            outcome.where[entry] += 1
        bad = make_bad_file(work / entry.split()[0] / "st", "random bytes", p.clip.weights, ".st")
        bad = bad.rename(bad.with_suffix(".safetensors"))
        _trial(outcome, f"{entry}, random .safetensors", argv(bad), bad, False)
        outcome.where[entry] += 1
    return outcome


def bad_checkpoint_files(p: Pipeline, work: Path) -> Outcome:
    """Every kind of bad file as a run's `last_state.pt` (train resumes) and as its
    `best.safetensors` (evaluate, predict)."""
    outcome = Outcome("bad checkpoint files (last_state.pt, best.safetensors)")
    image = next((p.data.images / "test").iterdir())
    for kind in KINDS:
        run = shutil.copytree(p.run, work / "state" / kind.replace(" ", "_") / "run")
        bad = make_bad_file(run.parent, kind, p.run / "last_state.pt")
        bad.replace(run / "last_state.pt")
        argv = train_args(p.train, p.labels, run, p.params)
        _trial_renamed(outcome, f"train resume, last_state.pt {kind}", argv, run / "last_state.pt")
        outcome.where["last_state.pt"] += 1
    for kind in ("empty", "random bytes", "truncated"):
        run = shutil.copytree(p.run, work / "best" / kind.replace(" ", "_") / "run")
        best = run / "best.safetensors"
        make_bad_file(run.parent, kind, p.run / "best.safetensors", ".safetensors").replace(best)
        evaluate = ["evaluate", "--checkpoint", run, "--test-cache", p.test, "--labels", p.labels]
        evaluate += ["--out", run.parent / "m.json", "--device", "cpu"]
        predict = ["predict", "--checkpoint", run, "--model", p.clip.config]
        predict += ["--pretrained", p.clip.weights, "--labels", "red", "--device", "cpu", image]
        for name, argv in (("evaluate", evaluate), ("predict", predict)):
            _trial_renamed(outcome, f"{name}, best.safetensors {kind}", argv, best)
            outcome.where["best.safetensors"] += 1
    return outcome


def _trial_renamed(outcome: Outcome, what: str, argv: list[object], bad: Path) -> None:
    """`_trial` for a bad file moved into a run directory (its marker stays one level up)."""
    code, output, escaped = cli(*argv)
    if (bad.parent.parent / "code_ran").exists():
        outcome.note(f"{what}: code from the pickle ran")
        outcome.add(wrong=True)
        return
    judge(outcome, what, code, output, escaped, bad)
