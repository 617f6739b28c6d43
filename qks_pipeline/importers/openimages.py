"""Open Images v4 (2018_04) image-level labels, as LESA/BiAM/QKS use them.

Seen = the MIDs of classes-trainable.txt; unseen = the 400 MIDs picked by top_400_unseen.csv (indices into the pickled
list of unseen_labels.pkl). Labels are written as display names (class-descriptions.csv), sorted alphabetically. A
display name shared by several of these MIDs is made unique by appending the MID: "Bat (/m/01h44)". Train images carry
seen labels, test images seen and unseen labels; annotations of other MIDs are ignored. An image whose positive and
negative labels intersect is dropped, as the reference does.
"""

from __future__ import annotations

import csv
import pickle
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

from qks_pipeline.errors import QKSError
from qks_pipeline.importers.common import ImportReport, require_file
from qks_pipeline.manifest import Record, read_labels, write_dataset

COLUMNS = ("ImageID", "LabelName", "Confidence")  # the annotation columns used (Source is ignored)


def read_class_descriptions(path: Path) -> dict[str, str]:
    """MID -> display name. No header; split at the first comma only; strip quotes and spaces."""
    require_file(path, "class descriptions")
    names: dict[str, str] = {}
    for i, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not text.strip():
            continue
        mid, sep, name = text.partition(",")
        mid, name = mid.strip(' "\t'), name.strip(' "\t')
        if not sep or not mid or not name:
            raise QKSError("expected 'MID,Display name'", path, i)
        if mid in names:
            raise QKSError(f"MID {mid} described twice", path, i)
        names[mid] = name
    return names


class _ListOnlyUnpickler(pickle.Unpickler):
    """Loads plain lists of strings; refuses every class, so a pickle cannot run code."""

    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only a list of MID strings is expected)")


def read_unseen_mids(pkl: Path, top: Path) -> list[str]:
    """The unseen MIDs: the first column of `top` indexes the list pickled in `pkl`."""
    with open(require_file(pkl, "unseen label list"), "rb") as f:
        try:
            pool = _ListOnlyUnpickler(f).load()
        except Exception as e:  # a damaged or foreign pickle raises many types
            raise QKSError(f"cannot read the pickled MID list ({e})", pkl) from None
    if not isinstance(pool, (list, tuple)) or not all(isinstance(m, str) for m in pool):
        raise QKSError("expected a pickled list of MID strings", pkl)
    mids = []
    with open(require_file(top, "top unseen indices"), encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        for row in rows:
            if not row or not row[0].strip():
                continue
            try:
                index = int(row[0])
            except ValueError:
                raise QKSError(f"first column must be an index, found {row[0]!r}", top, rows.line_num) from None
            if not 0 <= index < len(pool):
                raise QKSError(f"index {index} outside the {len(pool)} MIDs of {pkl.name}", top, rows.line_num)
            mids.append(pool[index].strip())
    return mids


def display_names(
    mids: list[str], descriptions: Mapping[str, str], source: Path, report: ImportReport
) -> dict[str, str]:
    """MID -> unique display name; a name shared by several MIDs gets " (MID)" appended (noted in the report)."""
    by_name = defaultdict(list)
    for mid in mids:
        if mid not in descriptions:
            raise QKSError(f"MID {mid} has no display name in class-descriptions.csv", source)
        by_name[descriptions[mid]].append(mid)
    out = {}
    for name, shared in by_name.items():
        for mid in shared:
            out[mid] = name if len(shared) == 1 else f"{name} ({mid})"
        if len(shared) > 1:
            report.notes.append(f"display name {name!r} shared by {', '.join(shared)}: written with the MID appended")
    return out


def read_annotations(
    path: Path, labels: Mapping[str, str], folder: str, split: str, report: ImportReport
) -> Iterator[Record]:
    """Group an image-labels CSV by image; yield a record per image with a label in `labels` (MID -> name).

    Args:
        path: the `<folder>-annotations-human-imagelabels.csv` file.
        labels: MID -> label name, for the MIDs this split uses; other annotations are ignored.
        folder: the release's split name, which is also the image folder (`<folder>/<ImageID>.jpg`).
        split: the manifest written ("train" or "test"), for the report.
        report: collects the images dropped.
    """
    groups: dict[str, tuple[list[str], list[str]]] = {}
    others: set[str] = set()  # images with an annotation outside `labels`
    with open(require_file(path, "annotations"), encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if not set(COLUMNS) <= set(header):
            raise QKSError(f"header must name {', '.join(COLUMNS)}; found {header}", path, 1)
        image_col, label_col, conf_col = (header.index(c) for c in COLUMNS)
        for row in rows:
            if not row:
                continue
            try:
                image, mid, confidence = row[image_col].strip(), row[label_col].strip(), float(row[conf_col])
            except (IndexError, ValueError):
                raise QKSError(
                    f"expected {len(header)} fields with a numeric Confidence", path, rows.line_num
                ) from None
            if confidence not in (0.0, 1.0) or not image:
                raise QKSError("expected an ImageID and a Confidence of 0 or 1", path, rows.line_num)
            name = labels.get(mid)
            if name is None:
                others.add(image)
                continue
            groups.setdefault(image, ([], []))[confidence == 0.0].append(name)  # [0]: positive, [1]: negative
    for image, (positive, negative) in groups.items():
        positive, negative = tuple(dict.fromkeys(positive)), tuple(dict.fromkeys(negative))
        if set(positive) & set(negative):
            report.drop(split, "positive and negative labels intersect")
        else:
            yield Record(f"{folder}/{image}.jpg", positive, negative)
    report.dropped[split, "no label of this split"] += len(others - groups.keys())


def import_openimages(
    root: str | Path, out: str | Path, train_split: str = "train", test_split: str = "test"
) -> ImportReport:
    """Write an Open Images dataset directory from the 2018_04 release folder `root`.

    `train_split` and `test_split` name the release folders read for train.jsonl and test.jsonl (e.g. "validation").
    """
    root = Path(root)
    if not root.is_dir():
        raise QKSError("Open Images release folder not found", root)
    descriptions = read_class_descriptions(root / "class-descriptions.csv")
    seen_mids = read_labels(require_file(root / "classes-trainable.txt", "trainable classes"))
    unseen_mids = read_unseen_mids(root / "unseen_labels.pkl", root / "top_400_unseen.csv")
    both = sorted(set(seen_mids) & set(unseen_mids))
    if both:
        raise QKSError(f"MID(s) both trainable and unseen: {both[:5]}", root / "top_400_unseen.csv")
    report = ImportReport(Path(out))
    names = display_names(seen_mids + unseen_mids, descriptions, root / "class-descriptions.csv", report)
    seen_names = {m: names[m] for m in seen_mids}
    seen, unseen = sorted(seen_names.values()), sorted(names[m] for m in unseen_mids)
    report.seen, report.unseen = len(seen), len(unseen)
    files = {s: root / s / f"{s}-annotations-human-imagelabels.csv" for s in (train_split, test_split)}
    splits = {
        "train": read_annotations(files[train_split], seen_names, train_split, "train", report),
        "test": read_annotations(files[test_split], names, test_split, "test", report),
    }
    report.written = write_dataset(out, seen, unseen, splits)
    return report
