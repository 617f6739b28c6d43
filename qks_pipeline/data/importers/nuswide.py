"""NUS-WIDE from its raw release (format: data_manifests/README.md): seen = the 1,000 tags minus the
concepts (925), unseen = the 81 concepts; every label is annotated, so the records are written with
`"negative": "*"`."""

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
    """Yield a record per image from a tag matrix; `concepts`: per image, its positive concepts
    (test) or nothing."""
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
            raise QKSError(
                f"expected 0 or 1, found {values[bad]!r} in column {bad + 1} ({tags[bad]!r})",
                dat,
                line,
            )
        # (925,)
        hit = np.frombuffer("".join(values).encode("ascii"), np.uint8)[seen_cols] == ord("1")
        positive = seen_names[hit].tolist() + list(concepts[rows] if concepts else ())
        yield Record(images[rows], tuple(positive), negative_rest=True)
        rows += 1
    if rows != len(images):
        raise QKSError(f"{rows} rows, but {image_list} lists {len(images)} images", dat)


def concept_truth(root: Path, concept: str, count: int, image_list: Path) -> list[bool]:
    """The test ground truth of one concept: Labels_<concept>_Test.txt, one 0/1 a line per test
    image."""
    path = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_Test.txt"
    values = read_lines(path, f"ground truth of concept {concept!r}", aligned=True, unique=False)
    for line, value in enumerate(values, 1):  # aligned: no blank line before the last value
        if value not in ("0", "1"):
            raise QKSError(f"expected 0 or 1, found {value!r}", path, line)
    if len(values) != count:
        raise QKSError(f"{len(values)} lines, but {image_list} lists {count} images", path)
    return [value == "1" for value in values]


def import_nuswide(root: str | Path, out: str | Path) -> ImportReport:
    """Write a NUS-WIDE dataset directory from the raw release at `root` (the folder holding
    ImageList/ etc.)."""
    root = Path(root)
    if not root.is_dir():
        raise QKSError("NUS-WIDE release folder not found", root)
    tag_dir, lists = root / "NUS_WID_Tags", root / "ImageList"
    tags = read_lines(tag_dir / "TagList1k.txt", "tag list", aligned=True)
    # Concepts81.txt at the release root, or inside ConceptsList/ as the release's zip unpacks it
    concept_files = [
        p
        for p in (root / "Concepts81.txt", root / "ConceptsList" / "Concepts81.txt")
        if p.is_file()
    ]
    if not concept_files:
        raise QKSError("Concepts81.txt not found (looked here and in ConceptsList/)", root)
    concepts = read_lines(concept_files[0], "concept list", aligned=True)
    seen, concept_names = (
        [t for t in tags if t not in set(concepts)],
        np.array(concepts, dtype=object),
    )
    report = ImportReport(Path(out))
    report.notes.append(
        f"{len(tags) - len(seen)} of the {len(concepts)} concepts are also tags (not seen labels)"
    )
    splits = {}
    for split, name in (("train", "Train"), ("test", "Test")):
        image_list = lists / f"{name}Imagelist.txt"
        # `actor\0001_2124494179.jpg` lines -> `Flickr/actor/0001_2124494179.jpg` manifest paths
        images = [
            "Flickr/" + n.replace("\\", "/")
            for n in read_lines(image_list, "image list", aligned=True)
        ]
        positives = []  # per test image, its positive concepts
        if split == "test":
            # (N, 81)
            truth = np.array(
                [concept_truth(root, c, len(images), image_list) for c in concepts], bool
            ).T
            positives = [tuple(concept_names[row]) for row in truth]
        splits[split] = tag_records(
            images, tag_dir / f"{name}_Tags1k.dat", image_list, tags, seen, positives
        )
    return report.write(seen, concepts, splits)
