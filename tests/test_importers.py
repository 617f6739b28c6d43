"""Importers on tiny fixtures written in each release's exact published format, quirks included."""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.data.manifest import (
    Record,
    check_dataset,
    read_labels,
    read_manifest,
    scored_labels,
    write_dataset,
)


def write(path: Path, lines: list[str], crlf: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + ("\r\n" if crlf else "\n") for line in lines).encode("utf-8"))
    return path


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def dataset(out: Path) -> tuple[list[str], list[str], list[Record], list[Record]]:
    """The dataset an importer wrote, `"negative": "*"` spelled out over the scored labels."""
    check_dataset(out)  # every importer's output passes the checker
    seen, unseen = read_labels(out / "seen.txt"), read_labels(out / "unseen.txt")

    def explicit(split: str) -> list[Record]:
        scored = scored_labels(split, seen, unseen)
        return [
            Record(r.image, r.positive, tuple(x for x in scored if x not in r.positive))
            if r.negative_rest
            else r
            for r in read_manifest(out / f"{split}.jsonl")
        ]

    return seen, unseen, explicit("train"), explicit("test")


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


# ---- NUS-WIDE raw release ----

TAGS = ["sky", "dog", "person", "old town", "cat"]  # 'old town': a label with a space
CONCEPTS = ["sky", "person", "airport"]  # two are tags too; seen = dog, old town, cat


def nuswide_release(root: Path) -> Path:
    # trailing spaces
    write(root / "NUS_WID_Tags" / "TagList1k.txt", [t + " " for t in TAGS], crlf=True)
    write(root / "ConceptsList" / "Concepts81.txt", CONCEPTS, crlf=True)
    write(
        root / "ImageList" / "TrainImagelist.txt",
        [r"actor\0001_11.jpg", r"actor\0002_12.jpg", r"beach\0003_13.jpg"],
    )
    write(
        root / "ImageList" / "TestImagelist.txt",
        [r"zoo\0004_14.jpg", r"zoo\0005_15.jpg"],
        crlf=True,
    )
    # Tab-separated rows with a trailing tab, as the release's .dat files.
    rows = {"Train": ["0 1 0 0 1", "1 0 1 1 0", "1 0 1 0 0"], "Test": ["0 0 0 1 0", "1 0 0 0 0"]}
    for split, lines in rows.items():
        write(
            root / "NUS_WID_Tags" / f"{split}_Tags1k.dat",
            [line.replace(" ", "\t") + "\t" for line in lines],
            True,
        )
    truth = {"sky": ["0", "0"], "person": ["1", "0"], "airport": ["0", "0"]}
    for concept, lines in truth.items():
        write(
            root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_Test.txt",
            lines,
            crlf=True,
        )
    return root


def test_nuswide(tmp_path):
    root = nuswide_release(tmp_path / "nus")
    out = tmp_path / "out"
    code, output = run("import", "nuswide", "--root", root, "--out", out)
    assert code == 0, output
    seen, unseen, train, test = dataset(out)
    assert (seen, unseen) == (["dog", "old town", "cat"], CONCEPTS)
    assert train == [
        Record("Flickr/actor/0001_11.jpg", ("dog", "cat"), ("old town",)),
        Record("Flickr/actor/0002_12.jpg", ("old town",), ("dog", "cat")),
    ]  # beach/0003: only concept tags (sky, person) set, no seen positive -> dropped
    # zoo/0005: its 'sky' tag is ignored (the concept ground truth says 0) -> no positive -> dropped
    assert test == [
        Record("Flickr/zoo/0004_14.jpg", ("old town", "person"), ("dog", "cat", "sky", "airport"))
    ]
    # fully annotated: the compact form
    assert '"negative": "*"' in (out / "train.jsonl").read_text()
    assert "train: 2 images written, dropped 1 (no positive label)" in output
    assert "test: 1 images written, dropped 1 (no positive label)" in output


TAG_DIR, TRUTH_DIR = "NUS_WID_Tags", "Groundtruth/TrainTestLabels"


def change(root: Path, name: str, lines: list[str] | None) -> None:
    """Replace a release file with `lines`, or delete it (None)."""
    if lines is None:
        (root / name).unlink()
    else:
        write(root / name, lines)


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        (
            f"{TAG_DIR}/Test_Tags1k.dat",
            ["0 0 0 1 0"],
            "1 rows, but {r}/ImageList/TestImagelist.txt lists 2",
        ),
        (
            f"{TAG_DIR}/Train_Tags1k.dat",
            ["0 1 0 0 1", "1 0 1", "1 0 1 0 0"],
            "Train_Tags1k.dat:2: expected 5 values",
        ),
        (
            f"{TAG_DIR}/Train_Tags1k.dat",
            ["0 1 0 0 1", "", "1 0 1 0 0"],
            "Train_Tags1k.dat:2: empty line",
        ),
        (
            f"{TAG_DIR}/Train_Tags1k.dat",
            ["0 1 0 0 1", "1 0 1 2 0", "1 0 1 0 0"],
            "Train_Tags1k.dat:2: expected 0 or 1, found '2' in column 4 ('old town')",
        ),
        (f"{TRUTH_DIR}/Labels_sky_Test.txt", ["0", "2"], "Labels_sky_Test.txt:2: expected 0 or 1"),
        (f"{TRUTH_DIR}/Labels_sky_Test.txt", ["0"], "Labels_sky_Test.txt: 1 lines, but"),
        (
            f"{TRUTH_DIR}/Labels_airport_Test.txt",
            None,
            "ground truth of concept 'airport' not found",
        ),
        (
            "ImageList/TrainImagelist.txt",
            [r"a\1.jpg", r"a\1.jpg", r"a\2.jpg"],
            "TrainImagelist.txt:2: 'a\\\\1.jpg' listed",
        ),
        ("ConceptsList/Concepts81.txt", None, "Concepts81.txt not found"),
    ],
)
def test_nuswide_bad_input(tmp_path, name, lines, message):
    root = nuswide_release(tmp_path / "nus")
    out = tmp_path / "out"
    change(root, name, lines)
    code, output = run("import", "nuswide", "--root", root, "--out", out)
    assert code == 1 and message.format(r=root) in output, output
    assert_nothing_written(tmp_path, out)


# ---- Open Images v4 ----

OI_HEADER = "ImageID,Source,LabelName,Confidence"
# (ImageID, Source, MID, Confidence); i1's /m/a row is repeated, i2's /m/c rows conflict
OI_TRAIN = [
    ("i1", "verification", "/m/a", 1),
    ("i1", "verification", "/m/d", 0),
    ("i1", "crowdsource-verification", "/m/u1", 1),
    ("i2", "verification", "/m/c", 1),
    ("i2", "crowdsource-verification", "/m/c", 0),
    ("i3", "verification", "/m/f", 1),
    ("i4", "verification", "/m/d", 0),
    ("i1", "verification", "/m/a", 1),
    ("i5", "verification", "/m/g", 1),
    ("i5", "verification", "/m/e", 0),
    ("i6", "verification", "/m/u3", 1),
    ("i6", "verification", "/m/a", 1),
    ("i7", "verification", "/m/d", 1),
]
OI_TEST = [
    ("t1", "verification", "/m/u1", 1),
    ("t1", "verification", "/m/a", 0),
    ("t2", "verification", "/m/u2", 0),
    ("t2", "verification", "/m/b", 1),
    ("t3", "verification", "/m/u3", 1),
]
# no header, CRLF, quoted names, a comma inside a name, display names shared by several MIDs
OI_DESCRIPTIONS = [
    "/m/a,Bat",
    '/m/b,"Bat"',
    '/m/c,"Walnut, nut"',
    "/m/d,Apple ",
    "/m/f,Unused",
    "/m/g,Apple",
    "/m/e,Flower",
    "/m/u1,Cat",
    "/m/u2,Ant",
    "/m/u3,Flower",
]
OI_TRAINABLE = ["/m/a", "/m/b", "/m/c", "/m/d", "/m/e"]
# unseen_labels.pkl; top_400_unseen.csv picks 3, 1, 4
OI_POOL = ["/m/x", "/m/u1", "/m/y", "/m/u2", "/m/u3"]


def openimages_release(root: Path, pool: object = None) -> Path:
    """A release in the real formats: metadata in `root/2018_04`, the image-label CSVs under it."""
    meta = root / "2018_04"
    write(meta / "class-descriptions.csv", OI_DESCRIPTIONS, crlf=True)
    write(meta / "classes-trainable.txt", OI_TRAINABLE, crlf=True)
    (meta / "unseen_labels.pkl").write_bytes(
        pickle.dumps(np.array(OI_POOL, dtype=object) if pool is None else pool)
    )
    write(meta / "top_400_unseen.csv", ["3,12", "1,40", "4,7"])
    for split, rows in (("train", OI_TRAIN), ("test", OI_TEST)):
        lines = [OI_HEADER] + [",".join(map(str, row)) for row in rows]
        write(meta / split / f"{split}-annotations-human-imagelabels.csv", lines, crlf=True)
    return root


def openimages_images(root: Path) -> Path:
    """Train images in the downloader's `train/NN/` layout (i7 not downloaded), test images flat."""
    for rel in [
        "train/00/i1.jpg",
        "train/00/i4.jpg",
        "train/01/i5.jpg",
        "train/01/i6.jpg",
        "train/01/i2.jpg",
        "test/t1.jpg",
        "test/t2.jpg",
        "test/t3.jpg",
    ]:
        write(root / rel, ["not decoded by the importer"])
    return root


# shared names get their MID
OI_SEEN = ["Apple", "Bat (/m/a)", "Bat (/m/b)", "Flower (/m/e)", "Walnut, nut"]
OI_UNSEEN = ["Ant", "Cat", "Flower (/m/u3)"]


@pytest.mark.parametrize("folder", ["", "2018_04"])  # the release folder or its metadata folder
def test_openimages(tmp_path, folder):
    root = openimages_release(tmp_path / "oi")
    out = tmp_path / "out"
    images = openimages_images(tmp_path / "images")
    code, output = run(
        "import", "openimages", "--root", root / folder, "--images", images, "--out", out
    )
    assert code == 0, output
    seen, unseen, train, test = dataset(out)
    assert (seen, unseen) == (OI_SEEN, OI_UNSEEN)
    # i2: conflicting Source rows; i3: no label of the split; i4, i5: negatives only; i7: never
    # downloaded.
    assert train == [
        Record("train/00/i1.jpg", ("Bat (/m/a)",), ("Apple",)),
        Record("train/01/i6.jpg", ("Bat (/m/a)",)),
    ]
    assert test == [
        Record("test/t1.jpg", ("Cat",), ("Bat (/m/a)",)),
        Record("test/t2.jpg", ("Bat (/m/b)",), ("Ant",)),
        Record("test/t3.jpg", ("Flower (/m/u3)",)),
    ]
    assert (
        "train: 2 images written, dropped 1 (image file not found), 1 (no label of this split), "
        "2 (no positive label), 1 (positive and negative labels intersect)"
    ) in output
    assert "5 images found under" in output and "as train/NN/<ImageID>.jpg" in output
    assert "3 images found under" in output and "as test/<ImageID>.jpg" in output
    assert (
        "display name 'Bat' shared by /m/a, /m/b" in output
        and "'Flower' shared by /m/e, /m/u3" in output
    )


def test_openimages_without_images_keeps_flat_paths(tmp_path):
    root = openimages_release(tmp_path / "oi")
    out = tmp_path / "out"
    code, output = run("import", "openimages", "--root", root, "--out", out)
    assert code == 0, output
    assert [r.image for r in dataset(out)[2]] == ["train/i1.jpg", "train/i6.jpg", "train/i7.jpg"]


def train_positives(by_name: bool) -> dict[str, set[str]]:
    """Training positives per image (as display names) when rows are matched by MID, as here, or by
    display name, as the authors' converter does: an independent re-statement of both, for the
    counts data_manifests/README.md quotes."""
    names = {line.split(",", 1)[0]: line.split(",", 1)[1].strip(' "') for line in OI_DESCRIPTIONS}
    seen_names = {names[m] for m in OI_TRAINABLE}
    out: dict[str, set[str]] = {}
    for image, _, mid, confidence in OI_TRAIN:
        if confidence == 1 and (names[mid] in seen_names if by_name else mid in OI_TRAINABLE):
            out.setdefault(image, set()).add(names[mid])
    return out


def test_openimages_matching_by_display_name_would_change():
    theirs, ours = train_positives(by_name=True), train_positives(by_name=False)
    # 2 of the 7 training images
    assert sorted(i for i in theirs if theirs[i] != ours.get(i)) == ["i5", "i6"]
    # a non-trainable MID named like a trainable class
    assert theirs["i5"] == {"Apple"} and "i5" not in ours
    # an unseen class trained on as seen
    assert theirs["i6"] == {"Bat", "Flower"} and ours["i6"] == {"Bat"}
    assert (
        len(
            {
                line.split(",")[1].strip(' "')
                for line in OI_DESCRIPTIONS
                if line.split(",")[0] in OI_TRAINABLE
            }
        )
        == 4
    )
    assert len(OI_SEEN) == 5  # the two MIDs named "Bat" are one label there, two here


@pytest.mark.parametrize(
    "pool",
    [
        OI_POOL,  # a plain list
        np.array(OI_POOL),  # a string dtype
        pickle.loads(pickle.dumps(np.array(OI_POOL, dtype=object), protocol=2)),
    ],
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_openimages_reads_the_pickled_mids_in_every_form(tmp_path, pool, protocol):
    root = openimages_release(tmp_path / "oi")
    out = tmp_path / "out"
    (root / "2018_04" / "unseen_labels.pkl").write_bytes(pickle.dumps(pool, protocol=protocol))
    code, output = run("import", "openimages", "--root", root, "--out", out)
    assert code == 0, output
    assert dataset(out)[1] == OI_UNSEEN


class Runs:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize(
    ("pool", "found"),
    [
        (
            OrderedDict(a="/m/u1"),
            "found collections.OrderedDict (refused: loading it could run code)",
        ),
        (Runs(), "found posix.system (refused"),
        ({"a": "/m/u1"}, "found dict"),
        (np.arange(5), "found a numpy array of int64 with shape (5,)"),
        ([b"/m/x", 3], "found a list holding int 3"),
    ],
)
def test_openimages_refuses_any_other_pickle(tmp_path, monkeypatch, pool, found):
    monkeypatch.chdir(tmp_path)
    root = openimages_release(tmp_path / "oi", pool)
    out = tmp_path / "out"
    code, output = run("import", "openimages", "--root", root, "--out", out)
    expected = (
        f"{root / '2018_04' / 'unseen_labels.pkl'}: "
        "expected a pickled list or numpy array of MID strings; "
    )
    assert code == 1 and expected + found in output and len(output.strip().splitlines()) == 1, (
        output
    )
    assert not (tmp_path / "pwned.txt").exists()
    assert_nothing_written(tmp_path, out)


META = "2018_04"
ANNOTATIONS = "2018_04/test/test-annotations-human-imagelabels.csv"


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        (
            f"{META}/top_400_unseen.csv",
            ["3", "9"],
            "top_400_unseen.csv:2: index 9 outside the 5 MIDs",
        ),
        (f"{META}/classes-trainable.txt", ["/m/a", "/m/zz"], "MID /m/zz has no display name"),
        (f"{META}/classes-trainable.txt", ["/m/a", "/m/u1"], "both trainable and unseen"),
        (
            f"{META}/class-descriptions.csv",
            ["/m/a,Bat", "/m/a,Bat"],
            "class-descriptions.csv:2: MID /m/a described",
        ),
        (
            f"{META}/class-descriptions.csv",
            ["/m/a,Bat", "/m/b"],
            "class-descriptions.csv:2: expected 'MID,Display",
        ),
        (
            f"{META}/class-descriptions.csv",
            None,
            "class-descriptions.csv not found here or in 2018_04/",
        ),
        (ANNOTATIONS, ["ImageID,LabelName"], f"{ANNOTATIONS}:1: header"),
        (ANNOTATIONS, [OI_HEADER, "t1,v,/m/a,0.5"], f"{ANNOTATIONS}:2: expected an ImageID"),
        (f"{META}/train/train-annotations-human-imagelabels.csv", None, "annotations not found"),
    ],
)
def test_openimages_bad_input(tmp_path, name, lines, message):
    root = openimages_release(tmp_path / "oi")
    out = tmp_path / "out"
    change(root, name, lines)
    code, output = run("import", "openimages", "--root", root, "--out", out)
    assert code == 1 and message in output, output
    assert_nothing_written(tmp_path, out)


# ---- COCO ----


def coco_file(path: Path, images: dict[int, str], annotations: list[tuple[int, int]]) -> Path:
    data = {
        "images": [
            {"id": i, "file_name": name, "width": 8, "height": 8} for i, name in images.items()
        ],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "iscrowd": 0}
            for n, (i, c) in enumerate(annotations)
        ],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 3, "name": "traffic light"},
            {"id": 7, "name": "dog"},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    train = coco_file(
        tmp_path / "train.json",
        {1: "a.jpg", 2: "b.jpg", 5: "c.jpg"},
        [(1, 1), (1, 7), (1, 1), (2, 7)],
    )
    test = coco_file(tmp_path / "val.json", {9: "d.jpg", 10: "e.jpg"}, [(9, 7), (9, 3), (10, 1)])
    return train, test


def test_coco(tmp_path):
    train, test = coco_files(tmp_path)
    out = tmp_path / "out"
    args = [
        "import",
        "coco",
        "--train-json",
        train,
        "--test-json",
        test,
        "--unseen",
        " dog ",
        "--out",
        out,
    ]
    code, output = run(*args, "--train-prefix", "train2017/", "--test-prefix", "val2017/")
    assert code == 0, output
    seen, unseen, train_records, test_records = dataset(out)
    assert (seen, unseen) == (["person", "traffic light"], ["dog"])
    # b.jpg has only the unseen dog, c.jpg no annotation: both dropped from train.
    assert train_records == [Record("train2017/a.jpg", ("person",), ("traffic light",))]
    assert test_records == [
        Record("val2017/d.jpg", ("traffic light", "dog"), ("person",)),
        Record("val2017/e.jpg", ("person",), ("traffic light", "dog")),
    ]
    assert "train: 1 images written, dropped 2 (no positive label)" in output


def test_coco_bad_input(tmp_path):
    train, test = coco_files(tmp_path)
    out = tmp_path / "out"
    code, output = run(
        "import",
        "coco",
        "--train-json",
        train,
        "--test-json",
        test,
        "--unseen",
        "dog,cat",
        "--out",
        out,
    )
    assert code == 1 and "--unseen: unseen label(s) ['cat'] are not categories" in output
    unseen_file = write(tmp_path / "unseen.txt", ["unicorn"])
    code, output = run(
        "import",
        "coco",
        "--train-json",
        train,
        "--test-json",
        test,
        "--unseen-file",
        unseen_file,
        "--out",
        out,
    )
    assert code == 1 and f"{unseen_file}: unseen label(s) ['unicorn']" in output
    test.write_text('{"images": [')
    code, output = run(
        "import",
        "coco",
        "--train-json",
        train,
        "--test-json",
        test,
        "--unseen",
        "dog",
        "--out",
        out,
    )
    assert code == 1 and f"{test}:1: not valid JSON" in output
    assert_nothing_written(tmp_path, out)


# ---- the reference implementation's CSV ----


REF_TRAIN = [
    "image_path,posi_labels,nega_labels",
    'data/oi/train/00/i1.jpg,"Walnut, nut|hot dog",Bat',
    "data/oi/train/01/i2.jpg,,Bat",
    r"data/oi\train\01\i3.jpg,Bat,Bat",
]
REF_TEST = [
    "image_path,unseen_posi_labels,unseen_nega_labels,seen_posi_labels,seen_nega_labels",
    'data/oi/test/t1.jpg,Cat,Ant,"Walnut, nut",Bat',
]


def reference_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "--seen-file": write(tmp_path / "label_seen.txt", ["Bat", "Walnut, nut", "Bat", "hot dog"]),
        "--unseen-file": write(tmp_path / "label_unseen.txt", ["Ant ", "Cat"], crlf=True),
        "--train-csv": write(tmp_path / "train.txt", REF_TRAIN, crlf=True),
        "--test-csv": write(tmp_path / "test.txt", REF_TEST),
    }


def test_reference_csv(tmp_path):
    files, out = reference_files(tmp_path), tmp_path / "out"
    args = [x for pair in files.items() for x in pair]
    code, output = run("import", "reference-csv", *args, "--strip-prefix", "data/oi/", "--out", out)
    assert code == 0, output
    seen, unseen, train, test = dataset(out)
    assert (seen, unseen) == (["Bat", "Walnut, nut", "hot dog"], ["Ant", "Cat"])
    # i2: no positive
    assert train == [Record("train/00/i1.jpg", ("Walnut, nut", "hot dog"), ("Bat",))]
    assert test == [Record("test/t1.jpg", ("Walnut, nut", "Cat"), ("Bat", "Ant"))]
    assert "dropped 1 (no positive label), 1 (positive and negative labels intersect)" in output
    assert "label_seen.txt: 1 repeated label line(s) merged" in output
    assert "negative columns are empty" not in output


def test_reference_csv_without_negatives(tmp_path):
    """Empty negative columns are reported; `--negatives rest` makes the others negative."""
    files = reference_files(tmp_path)
    out = tmp_path / "out"
    write(
        files["--train-csv"],
        ["image_path,posi_labels,nega_labels", "tr/1.jpg,Bat,", "tr/2.jpg,hot dog|Cat,"],
    )
    write(
        files["--test-csv"],
        ["image_path,posi_labels,nega_labels", "te/1.jpg,Cat,", "te/2.jpg,Bat,"],
    )
    args = [x for pair in files.items() for x in pair]
    code, output = run("import", "reference-csv", *args, "--out", out)
    assert code == 0 and output.count("the negative columns are empty on every row") == 2, output
    assert (
        "--negatives rest" in output
        and check_dataset(out).splits["test"].labels_without_negative() != []
    )
    code, output = run(
        "import", "reference-csv", *args, "--negatives", "rest", "--out", tmp_path / "rest"
    )
    assert code == 0 and "negative columns are empty" not in output, output
    seen, unseen, train, test = dataset(tmp_path / "rest")
    assert train == [
        Record("tr/1.jpg", ("Bat",), ("Walnut, nut", "hot dog")),
        # Cat is unseen: not scored in train
        Record("tr/2.jpg", ("hot dog", "Cat"), ("Bat", "Walnut, nut")),
    ]
    assert test[1] == Record("te/2.jpg", ("Bat",), ("Walnut, nut", "hot dog", "Ant", "Cat"))
    assert check_dataset(tmp_path / "rest").splits["train"].labels_without_negative() == []


def test_reference_csv_bad_input(tmp_path):
    files = reference_files(tmp_path)
    out = tmp_path / "out"
    args = [x for pair in files.items() for x in pair]
    code, output = run("import", "reference-csv", *args, "--strip-prefix", "other/", "--out", out)
    expected = (
        f"{files['--train-csv']}:2: "
        "image path 'data/oi/train/00/i1.jpg' does not start with 'other/'"
    )
    assert code == 1 and expected in output
    write(files["--test-csv"], ["image_path,posi_labels,nega_labels", "data/oi/t/1.jpg,Cat|Dog,"])
    code, output = run("import", "reference-csv", *args, "--strip-prefix", "data/oi", "--out", out)
    assert (
        code == 1
        and f"{files['--test-csv']}:2: label(s) not in the seen or unseen file: ['Dog']" in output
    )
    write(files["--test-csv"], ["path,labels", "t/1.jpg,Cat"])
    code, output = run("import", "reference-csv", *args, "--strip-prefix", "data/oi", "--out", out)
    assert code == 1 and f"{files['--test-csv']}:1: unexpected header" in output
    assert_nothing_written(tmp_path, out)


# ---- BiAM/MKT HDF5 label files ----


def hdf5_files(tmp_path: Path, test_width: int = 3) -> list[object]:
    seen, unseen = (
        write(tmp_path / "seen.txt", ["dog", "old town", "cat"]),
        write(tmp_path / "unseen.txt", ["sky", "airport"]),
    )
    with h5py.File(tmp_path / "train.h5", "w") as h5:
        h5["actor_0001_11.jpg-labels"] = np.array([1, -1, 1], np.int8)
        h5["beach_bum_0003_13.jpg-labels"] = np.array([-1, -1, 0], np.int8)  # no positive: dropped
    with h5py.File(tmp_path / "test.h5", "w") as h5:
        h5["zoo_0004_14.jpg-labels"] = np.array([-1, 1, 0, 1, -1][:test_width], np.int8)
        h5["zoo_0004_14.jpg-labels_81"] = np.array([1, -1], np.int8)
    train_names = write(
        tmp_path / "train_names.txt", ["actor_0001_11.jpg", "beach_bum_0003_13.jpg"], crlf=True
    )
    test_names = write(tmp_path / "test_names.txt", ["zoo_0004_14.jpg"])
    files = {
        "--train-h5": tmp_path / "train.h5",
        "--train-names": train_names,
        "--test-h5": tmp_path / "test.h5",
    }
    files |= {"--test-names": test_names, "--seen-file": seen, "--unseen-file": unseen}
    return [x for pair in files.items() for x in pair]


@pytest.mark.parametrize("test_width", [3, 5])  # seen only (BiAM) or seen + unseen (MKT's 1,006)
def test_hdf5(tmp_path, test_width):
    out = tmp_path / "out"
    code, output = run("import", "hdf5", *hdf5_files(tmp_path, test_width), "--out", out)
    assert code == 0, output
    seen, unseen, train, test = dataset(out)
    assert (seen, unseen) == (["dog", "old town", "cat"], ["sky", "airport"])
    assert train == [Record("Flickr/actor/0001_11.jpg", ("dog", "cat"), ("old town",))]
    assert test == [Record("Flickr/zoo/0004_14.jpg", ("old town", "sky"), ("dog", "airport"))]
    assert "train: 1 images written, dropped 1 (no positive label)" in output


def test_hdf5_bad_input(tmp_path):
    args = hdf5_files(tmp_path, test_width=4)
    out = tmp_path / "out"
    code, output = run("import", "hdf5", *args, "--out", out)
    assert (
        code == 1 and "test_names.txt:1: " in output and "has 4 values, expected 3 or 5" in output
    )
    write(tmp_path / "test_names.txt", ["zoo_0009_19.jpg"])
    code, output = run("import", "hdf5", *args, "--out", out)
    assert (
        code == 1
        and "test_names.txt:1: " in output
        and "no dataset 'zoo_0009_19.jpg-labels'" in output
    )
    assert_nothing_written(tmp_path, out)


def test_manifest_copies_a_checked_dataset(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    train = [Record("a.jpg", ("cat",), negative_rest=True)]
    test = [Record("b.jpg", ("owl",), ("cat",))]
    write_dataset(src, ["cat"], ["owl"], {"train": train, "test": test})
    code, output = run("import", "manifest", "--root", src, "--out", out)
    assert code == 0, output
    assert read_manifest(out / "train.jsonl") == train and read_manifest(out / "test.jsonl") == test
    (src / "unseen.txt").write_text("cat\n")  # now both seen and unseen: refused, nothing written
    code, output = run("import", "manifest", "--root", src, "--out", tmp_path / "bad")
    assert code == 1 and "both seen and unseen" in output and not (tmp_path / "bad").exists()
