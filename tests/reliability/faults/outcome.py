"""How the fault cases count: each case returns an `Outcome`, one row of the report's table.

Counting, per trial (one injected fault):
- survived: the pipeline ended in a correct state: nothing marked done was wrong, and the output
  (after a rerun once the fault is removed, where the case has one) equals a clean run's, or the
  refusal was the right decision. How the failure was reported does not count here: a traceback is
  an unclear error;
- data lost: work that had been marked done disappeared or had to be redone, a command reported
  success while its output lacked data, or a store was left that no rerun can complete;
- wrong results: something that passes as finished (a done marker, a complete store, a checkpoint)
  differs from what a clean run writes, or a refusal/acceptance was the wrong decision;
- unclear errors: a failure reported with a Python traceback, or without one `Error:` line naming
  the file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability.harness import Runner


class Unavailable(Exception):
    """A fault that cannot be injected here (e.g. mounting a tmpfs is not permitted)."""


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
    # kill cases: outputs driven from scratch to complete (each took several kills)
    rounds: int = 0
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
        """Count and note temporary files that writes `by` (e.g. "killed writes") left behind."""
        if files:
            self.litter += 1
            self.note(f"temporary files left by {by}: {files[:2]}")

    @property
    def clean(self) -> bool:
        return (
            self.trials > 0 and self.survived == self.trials and not (self.data_lost or self.wrong)
        )


@dataclass(frozen=True)
class Case:
    """What the trials of one case share: the runner, a clean run's output, the tally."""

    runner: Runner
    reference: Path
    outcome: Outcome


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
