"""NUS-WIDE from its raw release: image lists, the 1,000-tag matrices, the 81 concepts and their ground truth.

Seen labels = the 1,000 tags minus those that are also concepts (925 with the real files); unseen = the 81 concepts.
Every label is annotated (a 0 is a verified negative). Train images carry the seen tags; test images the seen tags and
the 81 concepts' ground truth. An image without a positive among its split's labels is left out by `write_dataset`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qks_pipeline.errors import QKSError
from qks_pipeline.importers.common import (
    ImportReport,
    iter_aligned_lines,
    read_aligned_lines,
    read_binary_column,
    require_file,
)
from qks_pipeline.manifest import Record

IMAGE_DIR = "Flickr"  # the release's image folder, relative to the image root


def read_image_list(path: Path) -> list[str]:
    """`actor\\0001_2124494179.jpg` lines -> `Flickr/actor/0001_2124494179.jpg` manifest paths."""
    require_file(path, "image list")
    return [IMAGE_DIR + "/" + name.replace("\\", "/") for name in read_aligned_lines(path, unique=True)]


def find_concepts(root: Path) -> Path:
    """Concepts81.txt at the release root, or inside ConceptsList/ as the release's zip unpacks it."""
    for path in (root / "Concepts81.txt", root / "ConceptsList" / "Concepts81.txt"):
        if path.is_file():
            return path
    raise QKSError("Concepts81.txt not found (looked here and in ConceptsList/)", root)


def tag_records(
    images: Sequence[str],
    dat: Path,
    image_list: Path,
    tags: Sequence[str],
    seen: Sequence[str],
    unseen: Sequence[str],
    truth: np.ndarray | None,
) -> Iterator[Record]:
    """Yield a record per image from a tag matrix (+ the concepts' ground truth `truth`, (N, 81) bool, for test)."""
    require_file(dat, "tag matrix")
    seen_cols = np.array([tags.index(t) for t in seen])  # positions of the seen tags among the 1,000 columns
    seen_names, unseen_names = np.array(seen, dtype=object), np.array(unseen, dtype=object)
    rows = 0
    for line, text in iter_aligned_lines(dat):
        values = text.split()
        if rows == len(images):
            raise QKSError(f"more rows than the {len(images)} images of {image_list}", dat, line)
        if len(values) != len(tags):
            raise QKSError(f"expected {len(tags)} values of 0/1 (one per tag), found {len(values)}", dat, line)
        if not set(values) <= {"0", "1"}:
            bad = next(j for j, v in enumerate(values) if v not in ("0", "1"))
            raise QKSError(f"expected 0 or 1, found {values[bad]!r} in column {bad + 1} ({tags[bad]!r})", dat, line)
        hit = np.frombuffer("".join(values).encode("ascii"), np.uint8)[seen_cols] == ord("1")  # (925,)
        positive = seen_names[hit].tolist()
        if truth is not None:
            positive += unseen_names[truth[rows]].tolist()
        # Every other scored label is a verified negative: written as "*" (see manifest.Record.negative_rest).
        yield Record(images[rows], tuple(positive), negative_rest=True)
        rows += 1
    if rows != len(images):
        raise QKSError(f"{rows} rows, but {image_list} lists {len(images)} images", dat)


def concept_truth(root: Path, concepts: Sequence[str], count: int, image_list: Path) -> np.ndarray:
    """(count, 81) bool: the test ground truth of every concept, from Labels_<concept>_Test.txt."""
    folder = root / "Groundtruth" / "TrainTestLabels"
    columns = []
    for concept in concepts:
        path = require_file(folder / f"Labels_{concept}_Test.txt", f"ground truth of concept {concept!r}")
        columns.append(read_binary_column(path, count, image_list))
    return np.array(columns, dtype=bool).T  # (count, 81)


def import_nuswide(root: str | Path, out: str | Path) -> ImportReport:
    """Write a NUS-WIDE dataset directory from the raw release at `root` (the folder holding ImageList/ etc.)."""
    root = Path(root)
    if not root.is_dir():
        raise QKSError("NUS-WIDE release folder not found", root)
    tag_list = require_file(root / "NUS_WID_Tags" / "TagList1k.txt", "tag list")
    tags = read_aligned_lines(tag_list, unique=True)
    concepts = read_aligned_lines(find_concepts(root), unique=True)
    concept_set = set(concepts)
    seen = [t for t in tags if t not in concept_set]
    report = ImportReport(Path(out))
    report.notes.append(f"{len(tags) - len(seen)} of the {len(concepts)} concepts are also tags (not seen labels)")
    lists, tag_dir = root / "ImageList", root / "NUS_WID_Tags"
    train_list, test_list = lists / "TrainImagelist.txt", lists / "TestImagelist.txt"
    train_images, test_images = read_image_list(train_list), read_image_list(test_list)
    truth = concept_truth(root, concepts, len(test_images), test_list)
    splits = {
        "train": tag_records(train_images, tag_dir / "Train_Tags1k.dat", train_list, tags, seen, concepts, None),
        "test": tag_records(test_images, tag_dir / "Test_Tags1k.dat", test_list, tags, seen, concepts, truth),
    }
    return report.write(seen, concepts, splits)
