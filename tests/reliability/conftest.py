"""Reliability suite: fault injection (kills, full disks, concurrent writers, stale caches) and a
bad-input corpus.

Cases marked `soak` (and `slow`) run many trials; they are skipped unless QKS_SOAK=1 is set or `-m
soak` is given, so the default `pytest` run (CI) stays fast. Runs are separate processes
(`harness.Runner`), forked from one warm process per session.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.harness import Runner, make_image_data
from tests.tiny import make_tiny_clip


def soak_enabled(config: pytest.Config) -> bool:
    return os.environ.get("QKS_SOAK") == "1" or "soak" in (config.getoption("markexpr", "") or "")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("soak") is not None and not soak_enabled(item.config):
        pytest.skip("soak case: set QKS_SOAK=1 or run with -m soak")


@pytest.fixture(scope="session")
def runner():
    """Starts `qks` runs as separate processes, forked from a warm process (harness.Runner)."""
    with Runner("fork") as r:
        yield r


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    """Tiny CLIP, weights A."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="session")
def other_clip(tmp_path_factory):
    """Tiny CLIP, weights B (same config)."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip_b"), seed=1)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """24 training and 8 test images (noise, JPEG and PNG, varied sizes)."""
    return make_image_data(tmp_path_factory.mktemp("images"), n_train=24)
