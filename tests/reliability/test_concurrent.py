"""Two `qks extract` on the same store at once: the second must refuse (a lock), or both must
cooperate safely; never a lost or corrupted write. The final store must verify and equal a single
run's.

The fast cases force one interleaving each (test instrumentation, tests/reliability/zygote.py), so
they fail or pass the same way every time; the soak case starts pairs together with no
instrumentation at all."""

from __future__ import annotations

import pytest

from tests.reliability.faults.concurrent import (
    concurrent_extractions,
    create_while_creating,
    replace_while_running,
)
from tests.reliability.harness import make_image_data


def test_a_second_extraction_while_the_first_creates_the_store(runner, images, clip, tmp_path):
    """Same settings, new store. The first run is paused just before it moves its freshly built
    `<store>.creating` into place; the second runs meanwhile and must refuse (the first holds the
    store's lock), not build its own store that the first then deletes."""
    outcome = create_while_creating(runner, tmp_path, images, clip)
    assert outcome.clean and outcome.unclear == 0, outcome.notes


def test_a_second_extraction_with_other_weights_while_one_runs(
    runner, images, clip, other_clip, tmp_path
):
    """The first extraction (weights A) is mid-run when `qks extract --replace-stale` with weights B
    starts on the same --out. Without a lock the second rebuilt the store while the first went on
    writing A's tokens into it and marking those shards done: a store that claimed weights B, passed
    `qks cache verify`, and held A's tokens."""
    outcome = replace_while_running(runner, tmp_path, images, clip, other_clip)
    assert outcome.clean, outcome.notes


@pytest.mark.slow
@pytest.mark.soak
def test_soak_twenty_pairs_started_together(runner, clip, tmp_path):
    """Twenty pairs started at the same moment, with no instrumentation."""
    data = make_image_data(tmp_path / "data", n_train=40)
    outcome = concurrent_extractions(runner, tmp_path / "runs", data, clip, trials=20)
    assert outcome.clean and outcome.unclear == 0, outcome.notes
