"""SIGKILL `qks extract` at random moments; each rerun resumes and the final store equals an
uninterrupted run's, every file byte for byte (token shards, valid, labels, paths, manifest_index,
visual_proj, metadata, done markers)."""

from __future__ import annotations

import shutil

import pytest

from tests.reliability.faults.kills import extraction_kills
from tests.reliability.harness import Runner, cli, compare_trees, extract_argv, make_image_data


def test_sigkill_extraction_three_times_resumes_byte_for_byte(runner, images, clip, tmp_path):
    outcome = extraction_kills(runner, tmp_path, images, clip, kills=3, seed=1)
    assert outcome.trials == 3
    assert outcome.clean, outcome.notes


def test_resume_clears_the_temporary_files_a_killed_run_left(images, clip, tmp_path):
    """What a SIGKILL inside a write leaves: zarr's `<chunk>.<uuid>.partial` and a done marker's
    `.tmp<pid>`, with that shard not marked done. The resumed store should equal a clean one, with
    no stray files (they hold up to a whole shard each, ~310 MB at the default size, and change the
    DVC hash of the output)."""
    clean, store = tmp_path / "clean.zarr", tmp_path / "killed.zarr"
    assert cli(*extract_argv(images, clip, clean, 4))[0] == 0
    shutil.copytree(clean, store)
    (store / "done/00002.json").unlink()
    shutil.copy(
        clean / "tokens/c/2/0/0/0",
        store / "tokens/c/2/0/0/0.0123456789abcdef0123456789abcdef.partial",
    )
    (store / "done/00002.json.tmp4242").write_text('{"shard": 2')
    assert cli(*extract_argv(images, clip, store, 4))[0] == 0
    diff = compare_trees(store, clean)
    assert diff.equal, diff.summary()
    assert not diff.litter, diff.litter


@pytest.mark.slow
@pytest.mark.soak
def test_soak_twenty_kills_in_one_run(runner, clip, tmp_path):
    """20 kills at random moments while one store of 160 images (80 shards of 2) is extracted."""
    data = make_image_data(tmp_path / "data", n_train=160)
    outcome = extraction_kills(runner, tmp_path / "run", data, clip, kills=20, seed=7)
    assert outcome.trials == 20 and outcome.rounds == 1
    assert outcome.clean, outcome.notes


@pytest.mark.slow
@pytest.mark.soak
def test_soak_kills_of_fresh_interpreters(images, clip, tmp_path):
    """Five kills of `qks` started as fresh interpreters (not forked), as from a user's shell."""
    with Runner("spawn") as spawn:
        outcome = extraction_kills(spawn, tmp_path, images, clip, kills=5, seed=3)
    assert outcome.clean, outcome.notes
