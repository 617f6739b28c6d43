"""A cache built from other weights, another model config, another manifest or another format version is refused by
train, evaluate and extract with one line naming the field that differs, and the refusal changes nothing."""

from __future__ import annotations

import pytest
from faults import StaleSetup, make_stale_setup, run_stale_case, stale_cases


@pytest.fixture(scope="module")
def setup(images, clip, other_clip, tmp_path_factory) -> StaleSetup:
    return make_stale_setup(tmp_path_factory.mktemp("stale"), images, clip, other_clip)


CASE_NAMES = [
    "train: label embeddings of other weights",
    "train: test cache of other weights",
    "train: resume a run of other weights",
    "train: cache of format version 2",
    "train: labels of format version 2",
    "evaluate: checkpoint vs test cache of other weights",
    "evaluate: label embeddings of other weights",
    "evaluate: label embeddings of another vocabulary",
    "evaluate: test cache of format version 2",
    "extract: store of other weights",
    "extract: store of another manifest",
    "extract: store of another model config",
    "extract: store of format version 2",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_stale_input_is_refused_naming_the_difference(setup, name):
    case = next(c for c in stale_cases(setup) if c.name == name)
    refused, unchanged, problems, line = run_stale_case(case)
    assert refused, line
    assert problems == [], line
    assert case.field in line and unchanged


def test_every_stale_case_is_listed(setup):
    assert [c.name for c in stale_cases(setup)] == CASE_NAMES
