"""Config values out of bounds: for every bounded key of every params section, values just outside
its range (and NaN, infinities, an empty list where they apply), given by `--set` to `qks train` and
in a params file. Each must be refused in one line naming the key, before anything is written; an
accepted value is a wrong result."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import yaml

from tests.reliability.faults.outcome import Outcome
from tests.reliability.faults.training import TrainSetup, train_argv
from tests.reliability.harness import cli, error_problems, last_line


def bad_values(bound, default: object) -> list[object]:
    """Values outside `bound` for a field whose default is `default` (a number or a list)."""
    number = default[0] if isinstance(default, list) else default
    # an int field (or int | "auto"): steps of 1
    step = 0.5 if isinstance(number, float) else 1
    values: list[object] = []
    if bound.low is not None:
        values.append(bound.low if bound.low_open else bound.low - step)
    if bound.high is not None:
        values.append(bound.high if bound.high_open else bound.high + step)
    if isinstance(number, float):
        values += [math.nan, math.inf, -math.inf]
    if isinstance(default, list):
        return [[v] for v in values] + [[]]
    return values


def bounded_keys() -> list[tuple[str, object, object]]:
    """(section.key, bound, default) of every bounded field of every params section."""
    from qks_pipeline.config import Params

    keys = []
    for section, cls in typing.get_type_hints(Params).items():
        for f in dataclasses.fields(cls):
            if "bound" in f.metadata:
                default = f.default_factory() if callable(f.default_factory) else f.default
                keys.append((f"{section}.{f.name}", f.metadata["bound"], default))
    return keys


def _yaml(value: object) -> str:
    """`value` as `--set` reads it (YAML): .nan and .inf for the floats YAML spells so."""
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return repr(value)


def config_bounds(work: Path, setup: TrainSetup) -> Outcome:
    """Every out-of-bounds value, by `--set` and by a params file, to `qks train`."""
    outcome = Outcome("config values out of bounds (--set and params file)")
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    base = yaml.safe_load(setup.params.read_text())
    for key, bound, default in bounded_keys():
        section, name = key.split(".")
        for value in bad_values(bound, default):
            params = work / f"{key}.yaml"
            sections = {
                **base,
                section: {**base.get(section, {}), name: yaml.safe_load(_yaml(value))},
            }
            params.write_text(yaml.safe_dump(sections))
            by_file = TrainSetup(setup.train, setup.labels, params)
            for how, argv in (
                ("--set", [*train_argv(setup, out), "--set", f"{key}={_yaml(value)}"]),
                ("params file", train_argv(by_file, out)),
            ):
                code, output, escaped = cli(*argv)
                problems = error_problems(output) if code else []
                problems += [] if key in last_line(output) else [f"does not name {key}"]
                problems += [f"escaped {type(escaped).__name__}"] if escaped else []
                if code == 0 or problems:
                    outcome.note(f"{key}={_yaml(value)} ({how}): exit {code}, {problems}")
                outcome.add(
                    wrong=code == 0 or out.exists(), unclear=bool(problems), ok=not problems
                )
            outcome.where[section] += 2
    return outcome
