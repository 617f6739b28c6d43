"""NUS-WIDE from its raw release (format: data_manifests/README.md).

Seen labels are the 1,000 tags minus the concepts (925), unseen labels the 81 concepts; every label
is annotated, so the records are written with `"negative": "*"`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qks_pipeline.data.importers import ImportReport
from qks_pipeline.data.manifest import Record, iter_lines, read_lines
from qks_pipeline.errors import QKSError


def tag_records(
    images: Sequence[str],
    dat: Path,
    image_list: Path,
    tags: Sequence[str],
    seen: Sequence[str],
    concepts: Sequence,
) -> Iterator[Record]:
    """A record per image of a tag matrix; `concepts`: each image's positive concepts, or []."""
    # positions of the seen tags among the 1,000 columns
    seen_cols = np.array([tags.index(t) for t in seen])
    seen_names = np.array(seen, dtype=object)
    rows = 0
    for line, text in iter_lines(dat, "tag matrix", aligned=True):
        values = text.split()
        if rows == len(images):
            raise QKSError(f"more rows than the {len(images)} images of {image_list}", dat, line)
        if len(values) != len(tags):
            raise QKSError(
                f"expected {len(tags)} values of 0/1 (one per tag), found {len(values)}", dat, line
            )
        if not set(values) <= {"0", "1"}:
            bad = next(j for j, v in enumerate(values) if v not in ("0", "1"))
            found = f"found {values[bad]!r} in column {bad + 1} ({tags[bad]!r})"
            raise QKSError(f"expected 0 or 1, {found}", dat, line)
        # (1000,) ASCII codes of '0' and '1'
        codes = np.frombuffer("".join(values).encode("ascii"), np.uint8)
        # (925,)
        hit = codes[seen_cols] == ord("1")
        positive = seen_names[hit].tolist()
        if concepts:
            positive += list(concepts[rows])
        yield Record(images[rows], tuple(positive), negative_rest=True)
        rows += 1
    if rows != len(images):
        raise QKSError(f"{rows} rows, but {image_list} lists {len(images)} images", dat)


def concept_truth(root: Path, concept: str, count: int, image_list: Path) -> list[bool]:
    """One concept's test ground truth: Labels_<concept>_Test.txt, a 0/1 line per test image."""
    path = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_Test.txt"
    values = read_lines(path, f"ground truth of concept {concept!r}", aligned=True, unique=False)
    # aligned: no blank line before the last value
    for line, value in enumerate(values, 1):
        if value not in ("0", "1"):
            raise QKSError(f"expected 0 or 1, found {value!r}", path, line)
    if len(values) != count:
        raise QKSError(f"{len(values)} lines, but {image_list} lists {count} images", path)
    return [value == "1" for value in values]


def read_concepts(root: Path) -> list[str]:
    """The 81 concepts: Concepts81.txt at the release root, or in ConceptsList/ (the zip's)."""
    for path in (root / "Concepts81.txt", root / "ConceptsList" / "Concepts81.txt"):
        if path.is_file():
            return read_lines(path, "concept list", aligned=True)
    raise QKSError("Concepts81.txt not found (looked here and in ConceptsList/)", root)


def concept_positives(
    root: Path, concepts: list[str], image_list: Path, count: int
) -> list[tuple[str, ...]]:
    """Per test image, its positive concepts."""
    columns = [concept_truth(root, concept, count, image_list) for concept in concepts]
    # (N, 81)
    truth = np.array(columns, bool).T
    concept_names = np.array(concepts, dtype=object)
    return [tuple(concept_names[row]) for row in truth]


def import_nuswide(root: str | Path, out: str | Path) -> ImportReport:
    """Write a NUS-WIDE dataset directory from the raw release `root` (holding ImageList/ etc.)."""
    root = Path(root)
    if not root.is_dir():
        raise QKSError("NUS-WIDE release folder not found", root)
    tag_dir = root / "NUS_WID_Tags"
    tags = read_lines(tag_dir / "TagList1k.txt", "tag list", aligned=True)
    concepts = read_concepts(root)
    concept_set = set(concepts)
    seen = [tag for tag in tags if tag not in concept_set]
    report = ImportReport(Path(out))
    also_tags = len(tags) - len(seen)
    report.notes.append(
        f"{also_tags} of the {len(concepts)} concepts are also tags (not seen labels)"
    )
    splits = {}
    for split, name in (("train", "Train"), ("test", "Test")):
        image_list = root / "ImageList" / f"{name}Imagelist.txt"
        names = read_lines(image_list, "image list", aligned=True)
        # `actor\0001_2124494179.jpg` lines -> `Flickr/actor/0001_2124494179.jpg` manifest paths
        images = ["Flickr/" + n.replace("\\", "/") for n in names]
        positives = []
        if split == "test":
            positives = concept_positives(root, concepts, image_list, len(images))
        dat = tag_dir / f"{name}_Tags1k.dat"
        splits[split] = tag_records(images, dat, image_list, tags, seen, positives)
    return report.write(seen, concepts, splits)
