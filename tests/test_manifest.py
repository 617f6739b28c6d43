"""Dataset directories: writing (all or nothing), checking, the CLI check, every bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from qks_pipeline.cli import main
from qks_pipeline.data.manifest import (
    Record,
    check_dataset,
    label_matrix,
    read_manifest,
    read_templates,
    scored_labels,
    write_dataset,
    write_labels,
    write_manifest,
)
from qks_pipeline.errors import ECHO_LIMIT, QKSError, shorten

REPO = Path(__file__).resolve().parents[1]
SCENE = [
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
]
SEEN, UNSEEN = ["cat", "dog", "old car"], ["zebra", "sea lion"]
TRAIN = [
    Record("a/1.jpg", ("cat", "old car"), ("dog",)),
    Record("a/2.jpg", ("dog",), ("cat", "zebra")),
    # no seen positive: counted by the check, left out by write_dataset
    Record("b/3.jpg", ("zebra",), ()),
    Record("b/6.jpg", ("dog",), negative_rest=True),
]
TEST = [
    Record("c/4.jpg", ("sea lion", "cat"), ("dog", "old car", "zebra")),
    Record("c/5.jpg", (), ("cat",)),  # no positive: left out by write_dataset
]


def make_dataset(path: Path) -> Path:
    """The files as a person may write them (write_dataset drops images without a positive)."""
    path.mkdir()
    write_labels(path / "seen.txt", SEEN)
    write_labels(path / "unseen.txt", UNSEEN)
    write_manifest(path / "train.jsonl", TRAIN)
    write_manifest(path / "test.jsonl", TEST)
    return path


def test_templates_file_is_open_clip_pool_plus_scene_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    expected = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + SCENE
    path = REPO / "qks_pipeline" / "templates.txt"
    assert path.read_text(encoding="utf-8").splitlines() == expected
    assert read_templates(path) == expected and len(expected) == 85


def test_write_dataset_round_trips_and_leaves_out_images_without_a_positive(tmp_path):
    out = tmp_path / "ds"
    written = write_dataset(out, SEEN, UNSEEN, {"train": iter(TRAIN), "test": TEST})
    assert sorted(p.name for p in out.iterdir()) == [
        "seen.txt",
        "test.jsonl",
        "train.jsonl",
        "unseen.txt",
    ]
    # b/3.jpg: no seen positive
    assert read_manifest(out / "train.jsonl") == [TRAIN[0], TRAIN[1], TRAIN[3]]
    assert read_manifest(out / "test.jsonl") == TEST[:1]
    assert [(s.images, s.no_positive) for s in written.values()] == [(4, 1), (2, 1)]
    assert (out / "unseen.txt").read_text() == "zebra\nsea lion\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary directory left


def test_check_dataset_counts_match_brute_force(tmp_path):
    report = check_dataset(make_dataset(tmp_path / "ds"))
    assert (report.seen, report.unseen, report.problems) == (SEEN, UNSEEN, [])
    for name, records, scored in (("train", TRAIN, SEEN), ("test", TEST, SEEN + UNSEEN)):
        split = report.splits[name]
        assert split.images == len(records)
        assert split.positives == Counter(label for r in records for label in r.positive)
        assert split.no_positive == sum(1 for r in records if not set(r.positive) & set(scored))
        fewest = min(sum(label in r.positive for r in records) for label in scored)
        assert split.min_positives()[0] == fewest
        for label in scored:
            negatives = sum(
                label in r.negative or (r.negative_rest and label not in r.positive)
                for r in records
            )
            assert split.negatives_of(label) == negatives, label
    assert report.splits["train"].labels_without_positive() == []
    assert report.splits["train"].labels_without_negative() == []
    assert report.splits["test"].labels_without_positive() == ["dog", "old car", "zebra"]
    assert report.splits["test"].labels_without_negative() == ["sea lion"]


def write_images(root: Path) -> None:
    for rec in TRAIN + TEST:
        (root / rec.image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(root / rec.image)


def test_check_dataset_collects_image_problems(tmp_path):
    out = make_dataset(tmp_path / "ds")
    root = tmp_path / "images"
    write_images(root)
    (root / "a/2.jpg").unlink()
    (root / "c/4.jpg").write_bytes(b"not a jpeg")
    report = check_dataset(out, root)
    assert [(p.image, p.reason.split(" ")[0], p.line) for p in report.problems] == [
        (root / "a/2.jpg", "missing", 2),
        (root / "c/4.jpg", "unreadable", 1),
    ]


def test_cli_check_summary_and_exit_codes(tmp_path):
    out = make_dataset(tmp_path / "ds")
    root = tmp_path / "images"
    write_images(root)
    ok = CliRunner().invoke(main, ["manifest", "check", str(out), "--images", str(root)])
    assert ok.exit_code == 0, ok.output
    assert "train: 4 images, 1 without a positive seen label" in ok.output
    assert "0 seen label(s) without a negative" in ok.output
    assert "1 seen + unseen label(s) without a negative: ['sea lion']" in ok.output
    assert "3 seen + unseen label(s) without a positive: ['dog', 'old car', 'zebra']" in ok.output
    assert "0 problem(s)" in ok.output
    (root / "b/3.jpg").unlink()
    bad = CliRunner().invoke(main, ["manifest", "check", str(out), "--images", str(root)])
    assert bad.exit_code == 1
    assert f"{root / 'b/3.jpg'}: missing ({out / 'train.jsonl'}:3)" in bad.output


def test_manifest_check_decodes_with_stage_ones_pixel_limit(tmp_path):
    out = make_dataset(tmp_path / "ds")
    root = tmp_path / "images"
    write_images(root)
    # 64 pixels an image: above a limit of 16 (twice it: Pillow's error)
    args = ["manifest", "check", str(out), "--images", str(root)]
    bombs = CliRunner().invoke(main, [*args, "--set", "extract.max_pixels=16"])
    assert bombs.exit_code == 1 and "6 problem(s)" in bombs.output, bombs.output
    reason = "decompression bomb: 64 pixels, above the limit of 16"
    assert f"{reason} (raise it with --set extract.max_pixels=N)" in bombs.output
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  max_pixels: 64\n")
    assert CliRunner().invoke(main, [*args, "--params", str(params)]).exit_code == 0


def test_a_huge_path_or_label_is_echoed_shortened(tmp_path):
    out = make_dataset(tmp_path / "ds")
    huge = "a" * 10_000_000 + ".jpg"
    rewrite(out / "train.jsonl", 2, {"image": huge, "positive": ["wolf"]})
    result = CliRunner().invoke(main, ["manifest", "check", str(out)])
    assert result.exit_code == 1 and len(result.output) < 500, result.output[:1000]
    assert "characters]" in result.output and "not in seen.txt or unseen.txt" in result.output
    # a valid path too long for any file system: the problem line is short too
    rewrite(out / "train.jsonl", 2, {"image": f"a/{'b' * 300_000}.jpg", "positive": ["dog"]})
    root = tmp_path / "images"
    write_images(root)
    result = CliRunner().invoke(main, ["manifest", "check", str(out), "--images", str(root)])
    assert result.exit_code == 1 and len(result.output) < 2_000, result.output[:3000]
    assert "characters]...bbb" in result.output and "bbb.jpg: unreadable" in result.output
    long_label = "x" * 5_000
    (out / "seen.txt").write_text(f"cat\n {long_label}\n")
    result = CliRunner().invoke(main, ["manifest", "check", str(out)])
    assert result.exit_code == 1 and len(result.output) < 500, result.output[:1000]


def test_an_error_shortens_the_middle_of_a_long_path():
    path = "/data/" + "x" * 1_000 + "/image.jpg"
    message = QKSError("missing", path).message
    assert message.startswith("/data/xxx") and message.endswith("xx/image.jpg: missing")
    assert len(message) <= ECHO_LIMIT + len(": missing") and "[856 characters]" in message
    assert shorten("short") == "short" and len(shorten("y" * 201)) <= ECHO_LIMIT


def rewrite(path: Path, line: int, obj: object) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = obj if isinstance(obj, str) else json.dumps(obj)
    path.write_text("\n".join(lines) + "\n")


BAD_INPUT = [
    (
        "train.jsonl",
        2,
        {"image": "a/2.jpg", "positive": ["wolf"]},
        "train.jsonl:2: ",
        "not in seen.txt or unseen.txt",
    ),
    ("train.jsonl", 2, {"image": "a/1.jpg"}, "train.jsonl:2: ", "listed twice"),
    ("test.jsonl", 2, {"image": "a/1.jpg"}, "test.jsonl:2: ", "also in train.jsonl (line 1)"),
    ("test.jsonl", 1, '{"image": "c/4.jpg", ', "test.jsonl:1: ", "not valid JSON"),
    ("test.jsonl", 1, {"image": "c/4.jpg", "labels": []}, "test.jsonl:1: ", "unknown key"),
    ("test.jsonl", 1, {"image": "../c/4.jpg"}, "test.jsonl:1: ", "must not contain '..'"),
    ("test.jsonl", 1, {"image": "/abs/4.jpg"}, "test.jsonl:1: ", "relative path"),
    ("test.jsonl", 1, {"image": "c\\4.jpg"}, "test.jsonl:1: ", "'/' separators"),
    (
        "test.jsonl",
        1,
        {"image": "c/4.jpg", "positive": ["cat"], "negative": ["cat"]},
        "test.jsonl:1: ",
        "both",
    ),
    ("unseen.txt", 2, "cat", "unseen.txt: ", "both seen and unseen"),
    ("seen.txt", 3, "cat", "seen.txt:3: ", "listed twice"),
    # CLIP lowercases: one embedding for both
    ("seen.txt", 2, "Cat", "seen.txt: ", "labels 'cat' and 'Cat' differ only in case or spaces"),
    ("unseen.txt", 1, "Old  Car", "unseen.txt: ", "labels 'old car' and 'Old  Car' differ only"),
]


@pytest.mark.parametrize(("name", "line", "content", "where", "what"), BAD_INPUT)
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, name, line, content, where, what):
    out = make_dataset(tmp_path / "ds")
    rewrite(out / name, line, content)
    with pytest.raises(QKSError) as err:
        check_dataset(out)
    assert where in err.value.message and what in err.value.message, err.value.message
    result = CliRunner().invoke(main, ["manifest", "check", str(out)])
    assert result.exit_code == 1 and where in result.output and "\n" not in result.output.strip()


def test_missing_dataset_file(tmp_path):
    out = make_dataset(tmp_path / "ds")
    (out / "test.jsonl").unlink()
    result = CliRunner().invoke(main, ["manifest", "check", str(out)])
    assert result.exit_code == 1 and f"{out / 'test.jsonl'}: manifest not found" in result.output


def _failing_records():
    yield Record("x/1.jpg", ("cat",))
    raise QKSError("broken source", "source.dat", 7)


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": TRAIN, "test": _failing_records()}, "source.dat:7: broken source"),
        (
            {"train": TRAIN, "test": [Record("y.jpg", ("wolf",))]},
            "test.jsonl:1: image 'y.jpg': label(s) not in",
        ),
        (
            {"train": TRAIN, "test": [Record("y.jpg"), Record("y.jpg")]},
            "test.jsonl:2: image 'y.jpg' listed twice",
        ),
        (
            {"train": TRAIN, "test": [Record("a/1.jpg", ("cat",))]},
            "test.jsonl:1: image 'a/1.jpg' is also in train",
        ),
        ({"train": TRAIN, "test": []}, "test.jsonl: no images left to write"),
        (
            {"train": TRAIN, "test": [Record("y.jpg", (), ("cat",))]},
            "test.jsonl: no images left to write",
        ),
    ],
)
def test_write_dataset_leaves_nothing_behind(tmp_path, splits, message):
    out = make_dataset(tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(QKSError) as err:
        write_dataset(out, SEEN, UNSEEN, splits)
    assert message in err.value.message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old dataset is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    with pytest.raises(QKSError):
        # seen/unseen overlap: nothing created
        write_dataset(tmp_path / "new", SEEN, ["cat"], {"train": TRAIN})
    assert not (tmp_path / "new").exists()


def test_reading_with_the_vocabulary_refuses_unknown_labels(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [Record("a.jpg", ("cat",), ("wolf",))])
    assert read_manifest(tmp_path / "m.jsonl") == [Record("a.jpg", ("cat",), ("wolf",))]
    with pytest.raises(
        QKSError,
        match=r"m.jsonl:1: image 'a.jpg': label\(s\) not in seen.txt or unseen.txt: \['wolf'\]",
    ):
        read_manifest(tmp_path / "m.jsonl", SEEN + UNSEEN)


def test_negative_rest_round_trip_and_label_matrix(tmp_path):
    """`"negative": "*"`: every other scored label a verified negative, nothing outside them."""
    seen, unseen = ["cat", "dog", "owl"], ["bee"]
    records = [Record("a.jpg", ("dog",), negative_rest=True), Record("b.jpg", ("owl",), ("cat",))]
    write_manifest(tmp_path / "train.jsonl", records)
    assert '"negative": "*"' in (tmp_path / "train.jsonl").read_text()
    back = read_manifest(tmp_path / "train.jsonl")
    assert back == records
    train = label_matrix(back, seen + unseen, rest=scored_labels("train", seen, unseen))
    assert train.tolist() == [[-1, 1, -1, 0], [-1, 0, 1, 0]]  # bee stays unknown in train
    test = label_matrix(back, seen + unseen, rest=scored_labels("test", seen, unseen))
    assert test.tolist() == [[-1, 1, -1, -1], [-1, 0, 1, 0]]


def test_bundled_sample_passes_the_check():
    sample = REPO / "data_manifests" / "sample"
    report = check_dataset(sample, sample)
    assert report.problems == []
    assert 40 <= len(report.seen) + len(report.unseen) <= 80
    for name, split in report.splits.items():
        assert split.no_positive == 0, name
    positives = report.splits["train"].positives + report.splits["test"].positives
    assert min(positives[label] for label in report.seen) >= 8
    # Unseen labels are absent from train.jsonl by design; every one must still be scorable in test.
    assert min(report.splits["test"].positives[label] for label in report.unseen) >= 3
