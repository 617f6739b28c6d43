"""The label store: label embeddings from the prompt pool, and the CLIP baseline's.

Layout: docs/design.md, section 2. Each array is one chunk with its crc32c (`store.checked`),
checked when read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from qks_pipeline.errors import QKSError
from qks_pipeline.store.checked import CheckedArray, missing_chunks, missing_error
from qks_pipeline.store.features import write_float32
from qks_pipeline.store.fingerprint import READ_VERSIONS
from qks_pipeline.store.location import Location

# (C, E) the CLIP baseline's labels: one template, L2-normalised
CLIP_EMBEDDINGS = "clip_embeddings"
# how the labels were embedded: must match
LABEL_EMBEDDING = ("normalize", "num_templates", "templates_sha256")


def write_label_embeddings(
    path: str | Path,
    label_names: list[str],
    embeddings: np.ndarray,
    fingerprint: dict[str, Any],
    clip_embeddings: np.ndarray | None = None,
    **attrs: Any,
) -> None:
    """Store label embeddings (C, E) float32 (and the CLIP baseline's), labels and fingerprint."""
    assert embeddings.shape[0] == len(label_names)
    with Location.of(path).building() as tmp:
        group = tmp.open_group("w")
        write_float32(group, "embeddings", embeddings)
        if clip_embeddings is not None:
            write_float32(group, CLIP_EMBEDDINGS, clip_embeddings)
        group.attrs.update({"fingerprint": fingerprint, "labels": list(label_names), **attrs})


def open_label_store(path: str | Path) -> tuple[Location, zarr.Group, dict[str, Any]]:
    """A label store's location, group and attributes; refused when absent or of another format."""
    location = Location.of(path)
    if not location.exists("zarr.json"):
        raise QKSError("no label embeddings here (run `qks embed-labels` first)", location.url)
    group = location.open_group("r")
    attrs = dict(group.attrs)
    fingerprint = attrs.get("fingerprint")
    version = fingerprint.get("format_version") if isinstance(fingerprint, dict) else None
    if "labels" not in attrs or "embeddings" not in group or version is None:
        raise QKSError("not a qks label store (no labels, embeddings or fingerprint)", location.url)
    if version not in READ_VERSIONS:
        raise QKSError(
            f"label embeddings of format version {version}, this qks reads versions "
            f"{READ_VERSIONS}; rebuild them",
            location.url,
        )
    return location, group, attrs


def read_label_embeddings(
    path: str | Path, array: str = "embeddings"
) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Return (label names, `array` (C, E) float32, attributes incl. `fingerprint`).

    A missing or damaged chunk is one error naming its file.
    """
    location, group, attrs = open_label_store(path)
    if array not in group:
        raise QKSError(
            f"the label store has no {array} (an older `qks embed-labels` made it); rerun it",
            location.url,
        )
    if missing := missing_chunks(location, array, group[array]):
        version = attrs["fingerprint"]["format_version"]
        raise missing_error(location, missing, version=version)
    values = CheckedArray(group[array], location, array)[:]
    return list(attrs["labels"]), values, attrs


def check_label_names(path: str | Path, found: list[str], expected: list[str], what: str) -> None:
    """Refuse a label list that is not the expected one, naming the first difference."""
    if found == expected:
        return
    # the first position where the lists differ
    i = 0
    while i < len(found) and i < len(expected) and found[i] == expected[i]:
        i += 1
    a = found[i] if i < len(found) else "<end>"
    b = expected[i] if i < len(expected) else "<end>"
    counts = f"{len(found)} labels vs {len(expected)}"
    raise QKSError(f"{what}: label {i} is {a!r}, {b!r} expected ({counts})", path)


def check_label_embedding(
    path: str | Path, found: dict[str, Any], expected: dict[str, Any] | None
) -> None:
    """Refuse labels embedded otherwise than a checkpoint's `label_embedding` (None: no check)."""
    if expected is None:
        return
    keys = [
        k for k in LABEL_EMBEDDING if expected.get(k) is not None and found.get(k) != expected[k]
    ]
    if keys:
        diffs = ", ".join(f"{k} {found.get(k)!r} vs {expected[k]!r}" for k in keys)
        raise QKSError(
            f"labels embedded otherwise than the checkpoint's ({diffs}); embed them with its pool",
            path,
        )
