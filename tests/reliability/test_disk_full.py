"""A full disk (ENOSPC on a small tmpfs) or a file-size limit (EFBIG, RLIMIT_FSIZE) during
extraction and during checkpoint writes: nothing is left that passes as complete, a rerun with space
completes equal to a clean run, and the failure is reported as one clear line naming the path."""

from __future__ import annotations

import pytest

from tests.reliability.faults.disk_full import (
    disk_full_checkpoint,
    disk_full_extraction,
    file_size_limit_extraction,
)
from tests.reliability.faults.outcome import Outcome, Unavailable
from tests.reliability.faults.training import make_train_setup


def _or_skip(make) -> Outcome:
    try:
        return make()
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def extraction(runner, images, clip, tmp_path_factory) -> list[Outcome]:
    """One disk-full trial early in the run and one late, and one file-size-limit trial."""
    work = tmp_path_factory.mktemp("diskfull")
    (work / "enospc").mkdir()
    (work / "efbig").mkdir()
    enospc = _or_skip(
        lambda: disk_full_extraction(runner, work / "enospc", images, clip, [0.15, 0.7])
    )
    return [enospc, file_size_limit_extraction(runner, work / "efbig", images, clip)]


@pytest.fixture(scope="module")
def checkpoint(runner, tmp_path_factory) -> Outcome:
    """One trial late in the run, one failing exactly in the first last_state.pt write."""
    work = tmp_path_factory.mktemp("ckpt_full")
    setup = make_train_setup(work / "setup", num_train=128, epochs=2)
    return _or_skip(lambda: disk_full_checkpoint(runner, work, setup, 2, [0.8], state_write=True))


def test_disk_full_during_extraction_leaves_nothing_that_passes_as_complete(extraction):
    for outcome in extraction:
        assert outcome.trials >= 1 and outcome.survived == outcome.trials, outcome.notes
        assert outcome.data_lost == 0 and outcome.wrong == 0, outcome.notes


def test_disk_full_during_extraction_is_one_clear_error_line(extraction):
    assert [o.unclear for o in extraction] == [0, 0], [o.notes for o in extraction]


def test_disk_full_during_checkpoint_writes_keeps_a_resumable_run(checkpoint):
    assert checkpoint.trials == 2 and checkpoint.survived == 2, checkpoint.notes
    assert checkpoint.data_lost == 0 and checkpoint.wrong == 0, checkpoint.notes


def test_disk_full_during_checkpoint_writes_is_one_clear_error_line(checkpoint):
    assert checkpoint.unclear == 0, checkpoint.notes


def test_a_failed_checkpoint_write_leaves_no_temporary_file(checkpoint):
    assert checkpoint.litter == 0, checkpoint.notes
