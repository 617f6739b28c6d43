"""BiAM/MKT-style HDF5 label files of NUS-WIDE (format: data_manifests/README.md).

Per image `<name>-labels` (+1/-1 over the seen tags, 0 unknown) and, in the test file,
`<name>-labels_81` over the 81 concepts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from qks_pipeline.data.importers import ImportReport
from qks_pipeline.data.manifest import (
    Record,
    check_vocabulary,
    read_labels,
    read_lines,
    require_file,
)
from qks_pipeline.errors import QKSError

LAYOUTS = ("flickr", "path")


def _image_path(name: str, layout: str, path: Path, line: int) -> str:
    """The image path of a name: layout "flickr" undoes BiAM/MKT's flattening, "path" keeps it.

    In layout "flickr", `actor_0001_21.jpg` is `Flickr/actor/0001_21.jpg`.
    """
    if layout == "path":
        return name.replace("\\", "/")
    parts = name.split("_")
    if len(parts) < 3:
        raise QKSError(
            f"{name!r} is not a flattened Flickr name '<folder>_<id>_<photo>.jpg'", path, line
        )
    folder = "_".join(parts[:-2])
    return f"Flickr/{folder}/{parts[-2]}_{parts[-1]}"


def _vector(h5: h5py.File, key: str, sizes: Sequence[int], where: tuple[Path, int]) -> np.ndarray:
    data = h5.get(key)
    if not isinstance(data, h5py.Dataset):
        raise QKSError(f"{h5.filename} has no dataset {key!r}", *where)
    values = np.asarray(data).ravel()
    if values.size not in sizes:
        expected = " or ".join(map(str, sizes))
        message = f"{h5.filename}: {key!r} has {values.size} values, expected {expected}"
        raise QKSError(message, *where)
    return values


def h5_records(
    h5_path: Path, names: Path, seen: Sequence[str], unseen: Sequence[str] | None, layout: str
) -> Iterator[Record]:
    """Records of the images listed in `names`; `unseen`: None in the train file (no labels_81)."""
    concepts = list(unseen or [])
    labels = np.array(list(seen) + concepts, dtype=object)
    # a test vector may cover seen + unseen labels (MKT's 1,006)
    sizes = (len(seen), len(seen) + len(concepts))
    with h5py.File(require_file(h5_path, "HDF5 label file"), "r") as h5:
        for line, name in enumerate(read_lines(names, "image-name list", aligned=True), 1):
            where = (names, line)
            values = _vector(h5, f"{name}-labels", sizes, where)[: len(seen)]
            if unseen is not None:
                concept_values = _vector(h5, f"{name}-labels_81", (len(unseen),), where)
                values = np.concatenate([values, concept_values])
            image = _image_path(name, layout, names, line)
            yield Record(image, tuple(labels[values > 0]), tuple(labels[values < 0]))


def import_hdf5(
    train_h5: str | Path,
    train_names: str | Path,
    test_h5: str | Path,
    test_names: str | Path,
    seen_file: str | Path,
    unseen_file: str | Path,
    out: str | Path,
    layout: str = "flickr",
) -> ImportReport:
    """Write a dataset directory from BiAM/MKT HDF5 label files.

    Args:
        train_h5: the train split's HDF5 label file.
        train_names: the train images' names, one a line (`<name>-labels` in `train_h5`).
        test_h5: the test split's HDF5 label file.
        test_names: the test images' names, one a line (`<name>-labels` in `test_h5`).
        seen_file: the seen tags in tag-list order.
        unseen_file: the 81 concepts.
        out: the dataset directory to write.
        layout: "flickr" (BiAM/MKT's flattened names) or "path" (names as they are).
    """
    assert layout in LAYOUTS, layout
    seen = read_labels(seen_file)
    unseen = read_labels(unseen_file)
    check_vocabulary(seen, unseen, Path(seen_file), Path(unseen_file))
    splits = {
        "train": h5_records(Path(train_h5), Path(train_names), seen, None, layout),
        "test": h5_records(Path(test_h5), Path(test_names), seen, unseen, layout),
    }
    return ImportReport(Path(out)).write(seen, unseen, splits)
