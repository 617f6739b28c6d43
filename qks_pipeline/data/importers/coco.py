"""COCO instances JSON (format: data_manifests/README.md).

Positives are the categories an image has an instance of; COCO is exhaustively labelled, so every
other category is a verified negative.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from qks_pipeline.data.importers import ImportReport
from qks_pipeline.data.manifest import Record, require_file
from qks_pipeline.errors import QKSError


def read_instances(path: Path) -> tuple[list[str], list[tuple[str, set[str]]]]:
    """An instances file's category names and [(file_name, its categories)], in file order."""
    try:
        data = json.loads(require_file(path, "COCO instances file").read_text(encoding="utf-8"))
        categories = {c["id"]: str(c["name"]).strip() for c in data["categories"]}
        images = {im["id"]: (str(im["file_name"]), set()) for im in data["images"]}
        pairs = [(a["image_id"], a["category_id"]) for a in data["annotations"]]
    except json.JSONDecodeError as e:
        raise QKSError(f"not valid JSON ({e.msg})", path, e.lineno) from None
    except (KeyError, TypeError) as e:
        raise QKSError(f"not a COCO instances file (missing or malformed {e})", path) from None
    if len(set(categories.values())) != len(categories):
        raise QKSError("two categories share a name", path)
    for image_id, category_id in pairs:
        if image_id not in images or category_id not in categories:
            raise QKSError(
                f"annotation of unknown image {image_id} or category {category_id}", path
            )
        images[image_id][1].add(categories[category_id])
    return list(categories.values()), list(images.values())


def coco_records(
    images: Sequence[tuple[str, set[str]]], labels: Sequence[str], prefix: str
) -> Iterator[Record]:
    """One record per image over `labels`: categories present positive, the rest negative."""
    for file_name, present in images:
        positive = tuple(label for label in labels if label in present)
        yield Record(prefix + file_name, positive, negative_rest=True)


def import_coco(
    train_json: str | Path,
    test_json: str | Path,
    unseen: Sequence[str],
    out: str | Path,
    train_prefix: str = "",
    test_prefix: str = "",
    unseen_source: str = "--unseen",
) -> ImportReport:
    """Write a COCO dataset directory.

    Args:
        train_json: the train split's instances file.
        test_json: the test split's instances file (the same categories).
        unseen: the categories held out as unseen labels.
        out: the dataset directory to write.
        train_prefix: prepended to the train file names (e.g. "train2017/"), so one image root
            serves both splits.
        test_prefix: prepended to the test file names.
        unseen_source: where `unseen` came from, for error messages.
    """
    train_json = Path(train_json)
    test_json = Path(test_json)
    categories, train_images = read_instances(train_json)
    test_categories, test_images = read_instances(test_json)
    if test_categories != categories:
        raise QKSError(f"categories differ from those of {train_json}", test_json)
    if not unseen or len(set(unseen)) != len(unseen):
        raise QKSError("unseen labels must be given, each once", unseen_source)
    if unknown := [u for u in unseen if u not in categories]:
        raise QKSError(
            f"unseen label(s) {unknown} are not categories of {train_json}", unseen_source
        )
    seen = [c for c in categories if c not in set(unseen)]
    splits = {
        "train": coco_records(train_images, seen, train_prefix),
        "test": coco_records(test_images, seen + list(unseen), test_prefix),
    }
    return ImportReport(Path(out)).write(seen, unseen, splits)
