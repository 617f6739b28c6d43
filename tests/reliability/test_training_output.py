"""A training output directory is one run's: a second `qks train` on it is refused while the first
runs, a resume on another training or label store is refused, and the temporary file of a killed
save is removed by the next start."""

from __future__ import annotations

import pytest

from tests.reliability.faults.training import TrainSetup, make_train_setup
from tests.reliability.faults.training_output import (
    concurrent_training,
    killed_save_litter,
    mismatched_resume,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> TrainSetup:
    return make_train_setup(tmp_path_factory.mktemp("train_output"), num_train=384, epochs=6)


def test_a_second_run_on_one_output_is_refused(runner, setup, tmp_path):
    outcome = concurrent_training(runner, tmp_path, setup, trials=1)
    assert outcome.clean and outcome.unclear == 0, outcome.notes


def test_a_resume_on_other_inputs_is_refused(tmp_path_factory, tmp_path):
    small = make_train_setup(tmp_path_factory.mktemp("small"), num_train=128, epochs=3)
    outcome = mismatched_resume(tmp_path, small)
    assert outcome.clean and outcome.unclear == 0, outcome.notes


def test_the_temporary_file_of_a_killed_save_is_removed(runner, setup, tmp_path):
    outcome = killed_save_litter(runner, tmp_path, setup, trials=1)
    assert outcome.clean and outcome.litter == 0, outcome.notes
