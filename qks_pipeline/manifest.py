"""Dataset manifests: the only input format of the pipeline (see data_manifests/README.md).

A dataset directory holds `train.jsonl` and `test.jsonl` (one JSON object a line:
`{"image": "rel/path.jpg", "positive": [...], "negative": [...]}`; labels not listed are unknown), and `seen.txt`,
`unseen.txt` (one label a line, fixed order, disjoint). Every label of a manifest is in seen + unseen. The
prompt-template pool is one template a line with `{}`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qks_pipeline.atomic import atomic_write
from qks_pipeline.errors import QKSError

SPLITS = ("train", "test")
MAX_LISTED = 20  # problems printed by a summary; the report keeps them all


@dataclass(frozen=True)
class Record:
    image: str  # path relative to the image root, with '/' separators
    positive: tuple[str, ...] = field(default=())
    negative: tuple[str, ...] = field(default=())
    # `"negative": "*"` in JSON: every label the split is scored on (train: seen; test: seen + unseen) that is not
    # positive is a verified negative. Fully annotated datasets (NUS-WIDE, COCO) would otherwise repeat ~1,000 names
    # on every line (about 1.5 GB for NUS-WIDE's train manifest).
    negative_rest: bool = False


ALL_OTHERS = "*"  # the JSON value of "negative" that sets `Record.negative_rest`
UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" turns a byte that is not UTF-8 into


def scored_labels(split: str, seen: Sequence[str], unseen: Sequence[str]) -> list[str]:
    """The labels a split is scored on (and that `"negative": "*"` covers): train seen only, test seen + unseen."""
    return list(seen) if split == "train" else list(seen) + list(unseen)


def _encodable(text: str) -> bool:
    """False for a string holding an unpaired surrogate (a JSON escape such as "\\ud800"): no file can be named so."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_image_path(image: str) -> str | None:
    """Why `image` is not a valid manifest path (relative, '/' separators, no '..'), or None when it is."""
    if not image.strip() or image != image.strip():
        return "'image' must be a non-empty path without surrounding spaces"
    if any(ord(c) < 32 or ord(c) == 127 for c in image) or not _encodable(image):
        return f"image {image!r} must not contain control characters or unpaired surrogates"
    if image.startswith("/") or "\\" in image or ":" in image.split("/")[0]:
        return f"image {image!r} must be a relative path with '/' separators"
    if ".." in image.split("/"):
        return f"image {image!r} must not contain '..'"
    return None


def _parse_record(text: str, path: Path, line: int) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise QKSError(f"not valid JSON ({e.msg})", path, line) from None
    except (ValueError, RecursionError) as e:  # a number too long to convert, arrays nested too deep
        raise QKSError(f"not valid JSON ({str(e).split(':')[0]})", path, line) from None
    if not isinstance(obj, dict):
        raise QKSError("a record must be a JSON object", path, line)
    extra = set(obj) - {"image", "positive", "negative"}
    if extra:
        raise QKSError(f"unknown key(s) {sorted(extra)}; expected image, positive, negative", path, line)
    image = obj.get("image")
    if not isinstance(image, str):
        raise QKSError("'image' must be a non-empty string", path, line)
    problem = check_image_path(image)
    if problem:
        raise QKSError(problem, path, line)
    rest = obj.get("negative") == ALL_OTHERS
    lists = []
    for key in ("positive", "negative"):
        value = [] if key == "negative" and rest else obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise QKSError(f"'{key}' must be a list of non-empty strings", path, line)
        if len(set(value)) != len(value):
            raise QKSError(f"'{key}' lists a label twice", path, line)
        # Interned: a fully annotated dataset repeats the same ~1,000 names on every line.
        lists.append(tuple(sys.intern(v) for v in value))
    both = set(lists[0]) & set(lists[1])
    if both:
        raise QKSError(f"label(s) both positive and negative: {sorted(both)}", path, line)
    return Record(image, *lists, negative_rest=rest)


def iter_manifest(path: str | Path) -> Iterator[tuple[int, Record]]:
    """Yield (line number, record) of a JSONL manifest, validating each record; duplicate images are an error."""
    path = Path(path)
    if not path.is_file():
        raise QKSError("manifest not found", path)
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for i, text in enumerate(f, 1):
            if bad := UNDECODABLE.search(text):
                raise QKSError(f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x})", path, i)
            if not text.strip():
                continue
            rec = _parse_record(text, path, i)
            if rec.image in seen:
                raise QKSError(f"image {rec.image!r} listed twice (first on line {seen[rec.image]})", path, i)
            seen[rec.image] = i
            yield i, rec


def read_manifest(path: str | Path) -> list[Record]:
    """Read and validate a JSONL manifest; duplicate images are an error."""
    return [rec for _, rec in iter_manifest(path)]


def _record_line(r: Record) -> str:
    negative = ALL_OTHERS if r.negative_rest else list(r.negative)
    return json.dumps({"image": r.image, "positive": list(r.positive), "negative": negative}) + "\n"


def write_manifest(path: str | Path, records: Iterable[Record]) -> None:
    atomic_write(path, "".join(_record_line(r) for r in records))


def read_lines(path: str | Path, what: str) -> list[str]:
    """One entry a line; surrounding whitespace stripped; empty lines skipped; duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise QKSError(f"{what} file not found", path)
    try:
        content = path.read_text(encoding="utf-8-sig")  # universal newlines: \r\n and \r arrive as \n
    except UnicodeDecodeError as e:
        raise QKSError(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})", path) from None
    out, first = [], {}
    for i, text in enumerate(content.split("\n"), 1):  # not splitlines(): a label may hold \x0c, \x85 or \u2028
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
    atomic_write(path, "".join(f"{label}\n" for label in labels))


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


def label_matrix(
    records: Sequence[Record],
    vocabulary: Sequence[str],
    path: str | Path = "manifest",
    rest: Sequence[str] | None = None,
) -> np.ndarray:
    """(N, C) int8: +1 positive, -1 verified negative, 0 unknown. A label outside the vocabulary is an error.

    `rest`: the labels that `"negative": "*"` makes negative (`scored_labels` of the split); default: `vocabulary`.
    """
    index = {label: j for j, label in enumerate(vocabulary)}
    rest_columns = [index[label] for label in (vocabulary if rest is None else rest)]
    out = np.zeros((len(records), len(vocabulary)), dtype=np.int8)
    for i, rec in enumerate(records):
        if rec.negative_rest:
            out[i, rest_columns] = -1
        for value, labels in ((1, rec.positive), (-1, rec.negative)):
            for label in labels:
                j = index.get(label)
                if j is None:
                    raise QKSError(f"image {rec.image!r}: label {label!r} is not in the vocabulary", path)
                out[i, j] = value
    return out


def _check_label_list(labels: Sequence[str], path: Path) -> None:
    if not labels:
        raise QKSError("no labels", path)
    for label in labels:
        if not label or label != label.strip() or "\n" in label or "\r" in label:
            raise QKSError(f"label {label!r} must be non-empty, one line, without surrounding spaces", path)
    counts = Counter(labels)
    twice = sorted(label for label, n in counts.items() if n > 1)
    if twice:
        raise QKSError(f"label(s) listed twice: {twice[:5]}", path)


def _write_split(tmp: Path, final: Path, records: Iterable[Record], vocabulary: set[str]) -> int:
    """Stream records into `tmp`, checking each; messages name `final` and the record's line there."""
    first: dict[str, int] = {}
    with open(tmp, "w", encoding="utf-8") as f:
        for line, rec in enumerate(records, 1):
            problem = check_image_path(rec.image)
            if problem:
                raise QKSError(problem, final, line)
            if rec.image in first:
                raise QKSError(f"image {rec.image!r} written twice (first on line {first[rec.image]})", final, line)
            unknown = (set(rec.positive) | set(rec.negative)) - vocabulary
            if unknown:
                raise QKSError(
                    f"image {rec.image!r}: label(s) not in seen + unseen: {sorted(unknown)[:5]}", final, line
                )
            both = set(rec.positive) & set(rec.negative)
            assert not both, f"{rec.image}: both positive and negative: {both}"
            first[rec.image] = line
            f.write(_record_line(rec))
    if not first:
        raise QKSError("no images left to write", final)
    return len(first)


def write_dataset(
    out_dir: str | Path, seen: Sequence[str], unseen: Sequence[str], splits: Mapping[str, Iterable[Record]]
) -> dict[str, int]:
    """Write a dataset directory (`seen.txt`, `unseen.txt`, `<split>.jsonl`), all or nothing.

    Records are streamed (an importer may yield them lazily) into a temporary sibling directory and every record is
    checked; only when all files are complete are they renamed into `out_dir`. On any error nothing is left behind.

    Returns:
        Images written per split.
    """
    out_dir = Path(out_dir)
    _check_label_list(seen, out_dir / "seen.txt")
    _check_label_list(unseen, out_dir / "unseen.txt")
    both = sorted(set(seen) & set(unseen))
    if both:
        raise QKSError(f"label(s) both seen and unseen: {both[:5]}", out_dir / "unseen.txt")
    vocabulary = set(seen) | set(unseen)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = {
            name: _write_split(tmp / f"{name}.jsonl", out_dir / f"{name}.jsonl", records, vocabulary)
            for name, records in splits.items()
        }
        write_labels(tmp / "seen.txt", seen)
        write_labels(tmp / "unseen.txt", unseen)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in [f"{s}.jsonl" for s in splits] + ["seen.txt", "unseen.txt"]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


# ---- checking a dataset directory ----


@dataclass
class SplitSummary:
    scored: list[str]  # the labels this split is scored on: seen for train, seen + unseen for test
    scope: str  # names `scored` in the summary: "seen" or "seen + unseen"
    images: int = 0
    no_positive: int = 0  # images without a positive among `scored`
    positives: Counter = field(default_factory=Counter)  # label -> images where it is positive
    negatives: Counter = field(default_factory=Counter)  # label -> images where it is a verified negative

    def add(self, rec: Record, scored: set[str]) -> None:
        self.images += 1
        self.positives.update(rec.positive)
        self.negatives.update(set(self.scored) - set(rec.positive) if rec.negative_rest else rec.negative)
        if scored.isdisjoint(rec.positive):
            self.no_positive += 1

    def min_positives(self) -> tuple[int, str]:
        """The fewest positive images of a scored label, and that label (the first such in label order)."""
        label = min(self.scored, key=lambda name: self.positives[name])
        return self.positives[label], label

    def labels_without_positive(self) -> list[str]:
        return [label for label in self.scored if not self.positives[label]]


@dataclass
class Problem:
    manifest: Path
    line: int
    image: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.image}: {self.reason} ({self.manifest}:{self.line})"


@dataclass
class DatasetReport:
    dataset_dir: Path
    seen: list[str]
    unseen: list[str]
    splits: dict[str, SplitSummary]
    image_root: Path | None = None  # None: image files were not checked
    problems: list[Problem] = field(default_factory=list)  # image files that are missing or unreadable

    def summary_lines(self) -> list[str]:
        """A readable summary: counts per split, label statistics, then every problem."""
        out = [f"{self.dataset_dir}: {len(self.seen)} seen + {len(self.unseen)} unseen labels"]
        for name, s in self.splits.items():
            low, label = s.min_positives()
            scored = s.scope
            out.append(f"  {name}: {s.images} images, {s.no_positive} without a positive {scored} label")
            out.append(f"    fewest positives of a {scored} label: {low} ({label!r})")
            missing = s.labels_without_positive()
            if missing:
                out.append(f"    {len(missing)} {scored} label(s) without a positive: {missing[:10]}")
        if self.image_root is None:
            out.append("image files not checked (no image root given)")
        else:
            out.append(f"image files under {self.image_root}: {len(self.problems)} problem(s)")
            out.extend(f"  {p}" for p in self.problems[:MAX_LISTED])
            if len(self.problems) > MAX_LISTED:
                out.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        return out


def _image_problem(file: Path) -> str | None:
    """Why an image file cannot be used, or None. Decoded fully, as extraction decodes it (`images.load_rgb`), so
    the check lists exactly the images extraction masks out: PIL's verify() misses truncated JPEGs and moderate
    decompression bombs."""
    from qks_pipeline.images import BadImage, load_rgb

    try:
        load_rgb(file)
    except BadImage as e:
        return e.reason if e.reason == "missing" else f"unreadable ({e.reason})"
    return None


def check_dataset(dataset_dir: str | Path, image_root: str | Path | None = None) -> DatasetReport:
    """Validate a dataset directory and count what it holds.

    Structural problems (a missing or malformed file, an unknown label, a label both seen and unseen, an image listed
    twice or in both splits) raise QKSError. Problems of image files (when `image_root` is given) are collected in the
    report instead, so one run lists them all.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise QKSError("dataset directory not found", dataset_dir)
    seen, unseen = read_vocabulary(dataset_dir)
    vocabulary = set(seen) | set(unseen)
    report = DatasetReport(dataset_dir, seen, unseen, {}, None if image_root is None else Path(image_root))
    first: dict[str, tuple[str, int]] = {}
    for split in SPLITS:
        path = dataset_dir / f"{split}.jsonl"
        scope = "seen" if split == "train" else "seen + unseen"
        summary = report.splits[split] = SplitSummary(scored_labels(split, seen, unseen), scope)
        scored = set(summary.scored)
        for line, rec in iter_manifest(path):
            unknown = (set(rec.positive) | set(rec.negative)) - vocabulary
            if unknown:
                raise QKSError(
                    f"image {rec.image!r}: label(s) not in seen.txt or unseen.txt: {sorted(unknown)}", path, line
                )
            if rec.image in first:
                raise QKSError(
                    f"image {rec.image!r} is also in {first[rec.image][0]} (line {first[rec.image][1]})", path, line
                )
            first[rec.image] = (path.name, line)
            summary.add(rec, scored)
            if report.image_root is not None:
                problem = _image_problem(report.image_root / rec.image)
                if problem:
                    report.problems.append(Problem(path, line, report.image_root / rec.image, problem))
        if not summary.images:
            raise QKSError("manifest has no images", path)
    return report
