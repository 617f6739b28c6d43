"""Dataset manifests: the only input format of the pipeline (see data_manifests/README.md).

A dataset directory holds `train.jsonl` and `test.jsonl` (one JSON object a line:
`{"image": "rel/path.jpg", "positive": [...], "negative": [...]}`; labels not listed are unknown), and `seen.txt`,
`unseen.txt` (one label a line, fixed order, disjoint). The prompt-template pool is one template a line with `{}`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qks_pipeline.errors import QKSError


@dataclass(frozen=True)
class Record:
    image: str  # path relative to the image root, with '/' separators
    positive: tuple[str, ...] = field(default=())
    negative: tuple[str, ...] = field(default=())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temporary name and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _parse_record(text: str, path: Path, line: int) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise QKSError(f"not valid JSON ({e.msg})", path, line) from None
    if not isinstance(obj, dict):
        raise QKSError("a record must be a JSON object", path, line)
    extra = set(obj) - {"image", "positive", "negative"}
    if extra:
        raise QKSError(f"unknown key(s) {sorted(extra)}; expected image, positive, negative", path, line)
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise QKSError("'image' must be a non-empty string", path, line)
    lists = []
    for key in ("positive", "negative"):
        value = obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise QKSError(f"'{key}' must be a list of non-empty strings", path, line)
        if len(set(value)) != len(value):
            raise QKSError(f"'{key}' lists a label twice", path, line)
        lists.append(tuple(value))
    both = set(lists[0]) & set(lists[1])
    if both:
        raise QKSError(f"label(s) both positive and negative: {sorted(both)}", path, line)
    return Record(image, *lists)


def read_manifest(path: str | Path) -> list[Record]:
    """Read and validate a JSONL manifest; duplicate images are an error."""
    path = Path(path)
    if not path.is_file():
        raise QKSError("manifest not found", path)
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, 1):
            if not text.strip():
                continue
            rec = _parse_record(text, path, i)
            if rec.image in seen:
                raise QKSError(f"image {rec.image!r} listed twice (first on line {seen[rec.image]})", path, i)
            seen[rec.image] = i
            records.append(rec)
    return records


def write_manifest(path: str | Path, records: Iterable[Record]) -> None:
    lines = (
        json.dumps({"image": r.image, "positive": list(r.positive), "negative": list(r.negative)}) for r in records
    )
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_lines(path: str | Path, what: str) -> list[str]:
    """One entry a line; surrounding whitespace stripped; empty lines skipped; duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise QKSError(f"{what} file not found", path)
    out, first = [], {}
    for i, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        value = text.strip()
        if not value:
            continue
        if value in first:
            raise QKSError(f"{what} {value!r} listed twice (first on line {first[value]})", path, i)
        first[value] = i
        out.append(value)
    if not out:
        raise QKSError(f"{what} file is empty", path)
    return out


def read_labels(path: str | Path) -> list[str]:
    return read_lines(path, "label")


def write_labels(path: str | Path, labels: Sequence[str]) -> None:
    atomic_write_text(path, "".join(f"{label}\n" for label in labels))


def read_templates(path: str | Path) -> list[str]:
    templates = read_lines(path, "template")
    for t in templates:
        if t.count("{}") != 1:
            raise QKSError(f"template {t!r} must contain exactly one '{{}}'", path)
    return templates


def read_vocabulary(dataset_dir: str | Path) -> tuple[list[str], list[str]]:
    """Seen and unseen labels of a dataset directory; they must be disjoint."""
    dataset_dir = Path(dataset_dir)
    seen, unseen = read_labels(dataset_dir / "seen.txt"), read_labels(dataset_dir / "unseen.txt")
    both = sorted(set(seen) & set(unseen))
    if both:
        raise QKSError(f"label(s) both seen and unseen: {both[:5]}", dataset_dir / "unseen.txt")
    return seen, unseen


def label_matrix(records: Sequence[Record], vocabulary: Sequence[str], path: str | Path = "manifest") -> np.ndarray:
    """(N, C) int8: +1 positive, -1 verified negative, 0 unknown. A label outside the vocabulary is an error."""
    index = {label: j for j, label in enumerate(vocabulary)}
    out = np.zeros((len(records), len(vocabulary)), dtype=np.int8)
    for i, rec in enumerate(records):
        for value, labels in ((1, rec.positive), (-1, rec.negative)):
            for label in labels:
                j = index.get(label)
                if j is None:
                    raise QKSError(f"image {rec.image!r}: label {label!r} is not in the vocabulary", path)
                out[i, j] = value
    return out
