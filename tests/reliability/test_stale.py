"""A cache built from other weights, another model config, another manifest or another format
version is refused by train, evaluate and extract with one line naming the field that differs, and
the refusal changes nothing."""

from __future__ import annotations

import pytest

from tests.reliability.faults.stale import StaleSetup, make_stale_setup, run_stale_case, stale_cases


@pytest.fixture(scope="module")
def setup(images, clip, other_clip, tmp_path_factory) -> StaleSetup:
    return make_stale_setup(tmp_path_factory.mktemp("stale"), images, clip, other_clip)


def test_stale_inputs_are_refused_naming_the_difference(setup):
    cases = stale_cases(setup)
    assert {c.name.split(":")[0] for c in cases} == {"train", "evaluate", "extract"}
    failed = []
    for case in cases:
        refused, unchanged, problems, line = run_stale_case(case)
        if not (refused and unchanged and not problems and case.field in line):
            failed.append(
                f"{case.name}: refused={refused} unchanged={unchanged} {problems} {line!r}"
            )
    assert failed == []
