"""Damaged stores and bad files: a chunk missing or one bit flipped in each array of a feature or
label store, a lost shard file under a rerun of extract, and every kind of bad weights or checkpoint
file. Each is refused in one line naming the file (or, for a lost shard file, computed again); none
gives a silent wrong result or a traceback."""

from __future__ import annotations

import pytest

from tests.reliability.faults.bad_files import bad_checkpoint_files, bad_weights_files
from tests.reliability.faults.damage import (
    Pipeline,
    damaged_feature_stores,
    damaged_indexes,
    damaged_label_stores,
    lost_index_chunks,
    lost_shard_files,
    make_pipeline,
)


@pytest.fixture(scope="module")
def pipeline(images, clip, tmp_path_factory) -> Pipeline:
    return make_pipeline(tmp_path_factory.mktemp("pipeline"), images, clip)


@pytest.mark.parametrize("kind", ["missing", "flipped"])
def test_a_damaged_chunk_of_any_array_is_refused_naming_it(pipeline, tmp_path, kind):
    for outcome in (
        damaged_feature_stores(pipeline, tmp_path / "features", kind),
        damaged_label_stores(pipeline, tmp_path / "labels", kind),
        damaged_indexes(pipeline, tmp_path / "index", kind),
    ):
        assert outcome.clean and outcome.unclear == 0, outcome.notes


def test_a_lost_shard_file_is_computed_again(pipeline, tmp_path):
    for outcome in (
        lost_shard_files(pipeline, tmp_path / "features"),
        lost_index_chunks(pipeline, tmp_path / "index"),
    ):
        assert outcome.clean and outcome.unclear == 0, outcome.notes


def test_bad_weights_and_checkpoint_files_are_one_line_and_run_no_code(pipeline, tmp_path):
    for outcome in (
        bad_weights_files(pipeline, tmp_path / "weights"),
        bad_checkpoint_files(pipeline, tmp_path / "checkpoints"),
    ):
        assert outcome.clean and outcome.unclear == 0, outcome.notes
