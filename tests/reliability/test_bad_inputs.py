"""The bad-input corpus: malformed manifests (hypothesis and hand-picked), corrupt and odd images,
odd label files. Every case gives a correct result or one clear error line naming the file; never a
traceback or a wrong number."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from tests.reliability.corpus import (
    LABEL_CASES,
    NASTY_MANIFESTS,
    check_extracted_corpus,
    check_label_case,
    check_listed_problems,
    check_manifest_cli,
    check_read_manifest,
    make_image_corpus,
    manifest_bytes,
    write_corpus_dataset,
)
from tests.reliability.harness import ImageData, cli, extract_argv
from tests.tiny import SEEN, UNSEEN

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def dataset(tmp_path):
    """A dataset directory with a valid test split and vocabulary; each case writes train.jsonl."""
    (tmp_path / "seen.txt").write_text("\n".join(SEEN) + "\n")
    (tmp_path / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"image": "t/1.jpg", "positive": ["red"]}) + "\n"
    )
    return tmp_path


@FUZZ
@given(data=manifest_bytes())
def test_fuzzed_manifest_read(data, tmp_path):
    assert check_read_manifest(tmp_path / "train.jsonl", data) == []


@FUZZ
@given(data=manifest_bytes())
def test_fuzzed_manifest_check_cli(data, dataset):
    assert check_manifest_cli(dataset, data) == []


@pytest.mark.parametrize("name", list(NASTY_MANIFESTS))
def test_nasty_manifest(name, dataset, tmp_path):
    data = NASTY_MANIFESTS[name]
    assert check_read_manifest(tmp_path / "m.jsonl", data) == []
    assert check_manifest_cli(dataset, data) == []


@pytest.fixture(scope="module")
def image_corpus(clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("image_corpus")
    cases = make_image_corpus(root / "images")
    write_corpus_dataset(root / "dataset", cases)
    return root, cases


def test_odd_and_broken_images_through_extract(image_corpus, clip):
    """Broken files are masked and recorded with their reason; odd modes and a PNG named .jpg load
    as the plain RGB image of the same pixels; `qks cache verify` passes."""
    root, cases = image_corpus
    data = ImageData(root / "dataset", root / "images")
    store = root / "train.zarr"
    code, output, escaped = cli(*extract_argv(data, clip, store, 8))
    assert code == 0 and escaped is None, output
    assert check_extracted_corpus(store, cases) == {}
    assert cli("cache", "verify", store)[0] == 0


def test_manifest_check_lists_exactly_what_extraction_masks(image_corpus):
    root, cases = image_corpus
    code, output, escaped = cli("manifest", "check", root / "dataset", "--images", root / "images")
    assert code == 1 and escaped is None and "Traceback" not in output
    assert check_listed_problems(output, cases, root / "images") == {}


@pytest.mark.parametrize("case", LABEL_CASES, ids=[c.name for c in LABEL_CASES])
def test_label_file(case, clip, tmp_path):
    assert check_label_case(tmp_path, case, clip) == []


@pytest.mark.parametrize("name", ["a\x00.jpg", "a\ud800.jpg"])
def test_a_path_no_file_can_have_is_a_bad_image_not_a_crash(name, tmp_path):
    """The manifest refuses such names; `load_rgb` (used by `qks predict` too) must not crash."""
    from qks_pipeline.data.images import BadImage, load_rgb

    with pytest.raises(BadImage, match="unreadable"):
        load_rgb(tmp_path / name)
