"""Open Images v4 (2018_04) image-level labels as LESA/BiAM/QKS use them (data_manifests/README.md).

Labels are matched by MID (not display name, as the authors' converter does: that leaks unseen
classes into training) and written as display names, made unique by appending the MID: "Bat
(/m/01h44)". The pickled unseen MID list is read by an unpickler that admits nothing that can run
code.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from qks_pipeline.data.importers import ImportReport, csv_rows
from qks_pipeline.data.manifest import Record, read_lines, require_file
from qks_pipeline.errors import QKSError

# the annotation columns used (Source is ignored)
COLUMNS = ("ImageID", "LabelName", "Confidence")
# the release's metadata folder, which `--root` may name or hold
RELEASE = "2018_04"
# What a pickled list or numpy array of strings needs, and nothing that can run code: numpy 1.x/2.x
# array reconstruction (protocol 5 pickles fixed-size dtypes through _frombuffer), and bytes as
# protocols 0-2 spell them.
PICKLE_GLOBALS = {(f"numpy.{c}.multiarray", "_reconstruct") for c in ("core", "_core")}
PICKLE_GLOBALS |= {(f"numpy.{c}.numeric", "_frombuffer") for c in ("core", "_core")}
PICKLE_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


def read_class_descriptions(path: Path) -> dict[str, str]:
    """MID -> display name. No header; CSV quoting (`"Nut, walnut"`); an unquoted comma is kept."""
    names: dict[str, str] = {}
    for line, row in csv_rows(path, "class descriptions"):
        mid = row[0].strip(' "')
        name = ",".join(row[1:]).strip(' "')
        if not mid or not name:
            raise QKSError("expected 'MID,Display name'", path, line)
        if mid in names:
            raise QKSError(f"MID {mid} described twice", path, line)
        names[mid] = name
    return names


class _Refused(pickle.UnpicklingError):
    """A pickle naming a global outside PICKLE_GLOBALS (the message names it)."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in PICKLE_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def read_mid_pool(pkl: Path) -> list[str]:
    """The MIDs pickled in `pkl`: a list of strings or a 1-D numpy array of object or string dtype.

    A pickle that names anything else is refused, as loading it could run code.
    """
    expected = "expected a pickled list or numpy array of MID strings; found"
    with open(require_file(pkl, "unseen label list"), "rb") as f:
        try:
            # latin1: Python 2's str, as numpy advises
            pool = _ArrayUnpickler(f, encoding="latin1").load()
        except _Refused as e:
            raise QKSError(f"{expected} {e} (refused: loading it could run code)", pkl) from None
        # a damaged pickle raises many types
        except Exception as e:
            message = f"cannot read the pickled MID list ({type(e).__name__}: {e})"
            raise QKSError(message, pkl) from None
    if isinstance(pool, np.ndarray):
        if pool.ndim != 1 or pool.dtype.kind not in "OUS":
            found = f"a numpy array of {pool.dtype} with shape {pool.shape}"
            raise QKSError(f"{expected} {found}", pkl)
        pool = pool.tolist()
    if not isinstance(pool, (list, tuple)):
        raise QKSError(f"{expected} {type(pool).__name__}", pkl)
    for mid in pool:
        if not isinstance(mid, (str, bytes)):
            raise QKSError(f"{expected} a list holding {type(mid).__name__} {mid!r}", pkl)
    return [m.decode("utf-8", "replace") if isinstance(m, bytes) else m for m in pool]


def read_unseen_mids(pkl: Path, top: Path) -> list[str]:
    """The unseen MIDs: the first column of `top` indexes the MIDs pickled in `pkl`."""
    pool = read_mid_pool(pkl)
    mids = []
    for line, row in csv_rows(top, "top unseen indices"):
        try:
            index = int(row[0])
        except ValueError:
            raise QKSError(f"first column must be an index, found {row[0]!r}", top, line) from None
        if not 0 <= index < len(pool):
            raise QKSError(f"index {index} outside the {len(pool)} MIDs of {pkl.name}", top, line)
        mids.append(pool[index].strip())
    return mids


def display_names(
    mids: list[str], descriptions: Mapping[str, str], source: Path, report: ImportReport
) -> dict[str, str]:
    """MID -> unique display name; a name several MIDs share gets " (MID)" appended (and a note)."""
    by_name = defaultdict(list)
    for mid in mids:
        if mid not in descriptions:
            raise QKSError(f"MID {mid} has no display name in class-descriptions.csv", source)
        by_name[descriptions[mid]].append(mid)
    unique = {}
    for name, shared in by_name.items():
        if len(shared) == 1:
            unique[shared[0]] = name
            continue
        report.notes.append(
            f"display name {name!r} shared by {', '.join(shared)}: written with the MID appended"
        )
        for mid in shared:
            unique[mid] = f"{name} ({mid})"
    return unique


def locate_images(images: Path, folder: str, report: ImportReport) -> dict[str, str]:
    """ImageID -> the folder prefix of `<folder>/<ImageID>.jpg` or `<folder>/NN/<ImageID>.jpg`.

    The images are looked for under `images`; the layouts found are noted in the report.
    """
    top = images / folder
    flat = f"{folder}/"
    found = {}
    layouts = set()
    if not top.is_dir():
        raise QKSError(f"image folder {folder}/ not found", images)
    with os.scandir(top) as entries:
        for entry in entries:
            if entry.is_dir():
                prefix = sys.intern(f"{folder}/{entry.name}/")
                with os.scandir(entry.path) as files:
                    found.update((f.name[:-4], prefix) for f in files if f.name.endswith(".jpg"))
                layouts.add(f"{folder}/NN/<ImageID>.jpg")
            elif entry.name.endswith(".jpg"):
                found[entry.name[:-4]] = flat
                layouts.add(f"{folder}/<ImageID>.jpg")
    layouts_found = " and ".join(sorted(layouts)) or "(none)"
    report.notes.append(f"{len(found)} images found under {top} as {layouts_found}")
    return found


def read_annotations(
    path: Path,
    labels: Mapping[str, str],
    folder: str,
    split: str,
    report: ImportReport,
    found: dict | None,
) -> Iterator[Record]:
    """A record per image of a release split `folder` with a label in `labels` (MID -> name).

    The records are for manifest `split`. `found`: `locate_images` of the folder; None: the path is
    taken to be `<folder>/<ImageID>.jpg`, unchecked.
    """
    # ImageID -> ([positive names], [negative names])
    groups: dict[str, tuple[list[str], list[str]]] = {}
    # images with annotations of other MIDs
    others: set[str] = set()
    rows = csv_rows(path, "annotations")
    header = [h.strip() for h in next(rows, (1, []))[1]]
    if not set(COLUMNS) <= set(header):
        raise QKSError(f"header must name {', '.join(COLUMNS)}; found {header}", path, 1)
    image_col, label_col, conf_col = (header.index(c) for c in COLUMNS)
    for line, row in rows:
        try:
            image = row[image_col].strip()
            mid = row[label_col].strip()
            confidence = float(row[conf_col])
        except (IndexError, ValueError):
            raise QKSError(
                f"expected {len(header)} fields with a numeric Confidence", path, line
            ) from None
        if confidence not in (0.0, 1.0) or not image:
            raise QKSError("expected an ImageID and a Confidence of 0 or 1", path, line)
        if mid not in labels:
            others.add(image)
            continue
        positive, negative = groups.setdefault(image, ([], []))
        if confidence == 1.0:
            positive.append(labels[mid])
        else:
            negative.append(labels[mid])
    for image, (positive_names, negative_names) in groups.items():
        positive = tuple(dict.fromkeys(positive_names))
        negative = tuple(dict.fromkeys(negative_names))
        prefix = f"{folder}/" if found is None else found.get(image)
        if set(positive) & set(negative):
            report.dropped[split, "positive and negative labels intersect"] += 1
        elif prefix is None:
            report.dropped[split, "image file not found"] += 1
        else:
            yield Record(f"{prefix}{image}.jpg", positive, negative)
    report.dropped[split, "no label of this split"] += len(others - groups.keys())


def find_release(root: str | Path) -> Path:
    """The folder holding class-descriptions.csv: `root` or its 2018_04 subfolder."""
    for folder in (Path(root), Path(root) / RELEASE):
        if (folder / "class-descriptions.csv").is_file():
            return folder
    raise QKSError(
        f"class-descriptions.csv not found here or in {RELEASE}/ (the release's metadata folder)",
        root,
    )


def import_openimages(
    root: str | Path,
    out: str | Path,
    train_split: str = "train",
    test_split: str = "test",
    images: str | Path | None = None,
) -> ImportReport:
    """Write an Open Images dataset directory.

    Args:
        root: the release folder (or its 2018_04 subfolder, the metadata folder).
        out: the dataset directory to write.
        train_split: the release split (a folder of `root`) written as the train split.
        test_split: the release split written as the test split.
        images: where the images are; each is located there and one not found is left out.
            None: the paths are taken to be `<split>/<ImageID>.jpg`, unchecked.
    """
    root = find_release(root)
    descriptions = read_class_descriptions(root / "class-descriptions.csv")
    seen_mids = read_lines(root / "classes-trainable.txt", "trainable classes")
    unseen_mids = read_unseen_mids(root / "unseen_labels.pkl", root / "top_400_unseen.csv")
    if both := sorted(set(seen_mids) & set(unseen_mids)):
        raise QKSError(f"MID(s) both trainable and unseen: {both[:5]}", root / "top_400_unseen.csv")
    report = ImportReport(Path(out))
    descriptions_file = root / "class-descriptions.csv"
    names = display_names(seen_mids + unseen_mids, descriptions, descriptions_file, report)
    seen_names = {mid: names[mid] for mid in seen_mids}
    splits = {}
    for split, folder, labels in (("train", train_split, seen_names), ("test", test_split, names)):
        found = None
        if images is not None:
            found = locate_images(Path(images), folder, report)
        csv_file = root / folder / f"{folder}-annotations-human-imagelabels.csv"
        splits[split] = read_annotations(csv_file, labels, folder, split, report, found)
    seen = sorted(seen_names.values())
    unseen = sorted(names[mid] for mid in unseen_mids)
    return report.write(seen, unseen, splits)
