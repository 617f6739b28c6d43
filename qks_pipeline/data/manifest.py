"""Dataset manifests, the pipeline's only input format (data_manifests/README.md).

A dataset directory holds `train.jsonl`, `test.jsonl` (one
`{"image": ..., "positive": [...], "negative": [...]}` a line; labels not listed are unknown) and
`seen.txt`, `unseen.txt` (one label a line, disjoint).

The rules live in one place, `check_vocabulary` and `Validator`: reading, writing (`write_dataset`)
and `qks manifest check` (`check_dataset`) all apply them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qks_pipeline.atomic import atomic_write
from qks_pipeline.data.images import BadImage, load_rgb
from qks_pipeline.errors import QKSError, shorten

SPLITS = ("train", "test")
# the JSON value of "negative" that sets `Record.negative_rest`
ALL_OTHERS = "*"
# what errors="surrogateescape" turns a byte that is not UTF-8 into
UNDECODABLE = re.compile("[\udc80-\udcff]")
# left by a JSON escape such as "\\ud800": no file can be named so
UNPAIRED = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Record:
    # path relative to the image root, with '/' separators
    image: str
    positive: tuple[str, ...] = field(default=())
    negative: tuple[str, ...] = field(default=())
    # `"negative": "*"` in JSON: every label the split is scored on (train: seen; test: seen and
    # unseen) that is not positive is a verified negative. Fully annotated datasets (NUS-WIDE,
    # COCO) would otherwise repeat ~1,000 names on every line (1.5 GB for NUS-WIDE's train split).
    negative_rest: bool = False


def scored_labels(split: str, seen: Sequence[str], unseen: Sequence[str]) -> list[str]:
    """The labels a split is scored on (and `"negative": "*"` covers): train seen, test all."""
    if split == "train":
        return list(seen)
    return list(seen) + list(unseen)


def quoted(value: object) -> str:
    """A value from a file as a message echoes it: repr, shortened to `errors.ECHO_LIMIT`."""
    return shorten(repr(value))


def check_image_path(image: str) -> str | None:
    """Why `image` is not a valid manifest path (relative, '/' separators, no '..'), or None."""
    if not image.strip() or image != image.strip():
        return "'image' must be a non-empty path without surrounding spaces"
    has_control = any(ord(c) < 32 or ord(c) == 127 for c in image)
    if has_control or UNPAIRED.search(image):
        return f"image {quoted(image)} must not contain control characters or unpaired surrogates"
    if image.startswith("/") or "\\" in image or ":" in image.split("/")[0]:
        return f"image {quoted(image)} must be a relative path with '/' separators"
    if ".." in image.split("/"):
        return f"image {quoted(image)} must not contain '..'"
    return None


def clip_text_key(label: str) -> str:
    """What CLIP's tokenizer reads of a label: lowercased, runs of whitespace as one space. Two
    labels with one key get the same embedding."""
    return " ".join(label.lower().split())


def check_vocabulary(
    seen: Sequence[str], unseen: Sequence[str], seen_file: Path, unseen_file: Path
) -> None:
    """Check two label lists: each non-empty, a label a line, none twice, none both seen and unseen,
    no two equal up to case (`clip_text_key`: CLIP would embed them alike).

    Errors name `seen_file` or `unseen_file` (a dataset's seen.txt and unseen.txt, or an importer's
    sources).
    """
    for path, labels in ((seen_file, seen), (unseen_file, unseen)):
        if not labels:
            raise QKSError("no labels", path)
        for label in labels:
            if not label or label != label.strip() or {"\n", "\r"} & set(label):
                problem = "must be non-empty, one line, without surrounding spaces"
                raise QKSError(f"label {quoted(label)} {problem}", path)
        if twice := sorted(label for label, n in Counter(labels).items() if n > 1):
            raise QKSError(f"label(s) listed twice: {shorten(twice[:5])}", path)
    if both := sorted(set(seen) & set(unseen)):
        raise QKSError(f"label(s) both seen and unseen: {shorten(both[:5])}", unseen_file)
    _refuse_equal_up_to_case(seen, unseen, seen_file, unseen_file)


def _refuse_equal_up_to_case(
    seen: Sequence[str], unseen: Sequence[str], seen_file: Path, unseen_file: Path
) -> None:
    """Two labels that differ only in case or inner spaces, named with the file of the second."""
    first: dict[str, str] = {}
    for path, labels in ((seen_file, seen), (unseen_file, unseen)):
        for label in labels:
            other = first.setdefault(clip_text_key(label), label)
            if other != label:
                raise QKSError(
                    f"labels {quoted(other)} and {quoted(label)} differ only in case or spaces "
                    "(CLIP lowercases: they would get one embedding); keep one",
                    path,
                )


class Validator:
    """The rules of a record, across the manifests of one dataset.

    A valid image path, listed once in the dataset, no label twice in a list nor both positive and
    negative, and (when the vocabulary is known) only its labels.
    """

    def __init__(self, vocabulary: Collection[str] | None = None):
        self.vocabulary = None if vocabulary is None else set(vocabulary)
        # image -> (manifest, line) where it was first listed
        self.first: dict[str, tuple[Path, int]] = {}

    def check(self, rec: Record, path: Path, line: int) -> None:
        """Raise QKSError naming `path:line` when `rec` breaks a rule."""
        if problem := self._problem(rec, path):
            raise QKSError(problem, path, line)
        self.first[rec.image] = (path, line)

    def _problem(self, rec: Record, path: Path) -> str | None:
        if problem := check_image_path(rec.image):
            return problem
        for key, labels in (("positive", rec.positive), ("negative", rec.negative)):
            if len(set(labels)) != len(labels):
                return f"'{key}' lists a label twice"
        if both := set(rec.positive) & set(rec.negative):
            return f"label(s) both positive and negative: {sorted(both)}"
        if self.vocabulary is not None:
            unknown = (set(rec.positive) | set(rec.negative)) - self.vocabulary
            if unknown:
                listed = sorted(unknown)[:5]
                listed = shorten(listed)
                return (
                    f"image {quoted(rec.image)}: label(s) not in seen.txt or unseen.txt: {listed}"
                )
        if rec.image in self.first:
            where, first = self.first[rec.image]
            if where == path:
                return f"image {quoted(rec.image)} listed twice (first on line {first})"
            return f"image {quoted(rec.image)} is also in {where.name} (line {first})"
        return None


@dataclass
class SplitSummary:
    """What one split holds, counted as its records pass the validator."""

    # the labels this split is scored on: seen for train, seen + unseen for test
    scored: list[str]
    images: int = 0
    # images without a positive among `scored`
    no_positive: int = 0
    # label -> images where it is positive
    positives: Counter = field(default_factory=Counter)
    # label -> images listing it as negative
    negatives: Counter = field(default_factory=Counter)
    # images with `"negative": "*"`
    rest: int = 0
    # label -> those of them where it is positive
    rest_positives: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._scored = set(self.scored)

    def add(self, rec: Record) -> bool:
        """Count `rec`; True when it has a positive among the scored labels."""
        self.images += 1
        self.positives.update(rec.positive)
        self.negatives.update(rec.negative)
        if rec.negative_rest:
            self.rest += 1
            self.rest_positives.update(rec.positive)
        has_positive = not self._scored.isdisjoint(rec.positive)
        self.no_positive += not has_positive
        return has_positive

    def negatives_of(self, label: str) -> int:
        return self.negatives[label] + self.rest - self.rest_positives[label]

    def min_positives(self) -> tuple[int, str]:
        """The fewest positive images of a scored label, and that label (the first in order)."""
        label = min(self.scored, key=lambda name: self.positives[name])
        return self.positives[label], label

    def labels_without_positive(self) -> list[str]:
        return [label for label in self.scored if not self.positives[label]]

    def labels_without_negative(self) -> list[str]:
        return [label for label in self.scored if not self.negatives_of(label)]


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise QKSError(f"{what} not found", path)
    return path


def iter_lines(path: str | Path, what: str, aligned: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) of the non-blank lines of a UTF-8 text file.

    A BOM, CRLF and CR are allowed; '\\x0c', '\\x85', '\\u2028' end no line (a label may hold
    them). `aligned`: the n-th line belongs to the n-th item of another file, so an empty line
    followed by more data is an error (it would shift every later line against its partner).
    """
    path = require_file(path, what)
    # the first blank line
    blank = None
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for i, text in enumerate(f, 1):
            if bad := UNDECODABLE.search(text):
                raise QKSError(f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x})", path, i)
            if not text.strip():
                blank = blank or i
            elif aligned and blank:
                raise QKSError(
                    "empty line inside the file (lines must match another file one to one)",
                    path,
                    blank,
                )
            else:
                yield i, text


def read_lines(
    path: str | Path, what: str, aligned: bool = False, unique: bool = True
) -> list[str]:
    """The stripped lines of `iter_lines`; with `unique`, a line repeated is an error."""
    out = []
    # value -> its first line
    first = {}
    for i, text in iter_lines(path, what, aligned):
        value = text.strip()
        if unique and value in first:
            raise QKSError(f"{quoted(value)} listed twice (first on line {first[value]})", path, i)
        first.setdefault(value, i)
        out.append(value)
    if not out:
        raise QKSError(f"{what} is empty", path)
    return out


def read_labels(path: str | Path) -> list[str]:
    return read_lines(path, "label file")


def write_labels(path: str | Path, labels: Sequence[str]) -> None:
    atomic_write(path, "".join(f"{label}\n" for label in labels))


def lines_sha256(lines: Sequence[str]) -> str:
    """sha256 of the lines joined by newlines: the fingerprint of a template pool or vocabulary."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_templates(path: str | Path) -> list[str]:
    templates = read_lines(path, "template file")
    if bad := [t for t in templates if t.count("{}") != 1]:
        raise QKSError(f"template {quoted(bad[0])} must contain exactly one '{{}}'", path)
    return templates


def read_vocabulary(dataset_dir: str | Path) -> tuple[list[str], list[str]]:
    """Seen and unseen labels of a dataset directory, checked by `check_vocabulary`."""
    seen_file = Path(dataset_dir) / "seen.txt"
    unseen_file = Path(dataset_dir) / "unseen.txt"
    seen = read_labels(seen_file)
    unseen = read_labels(unseen_file)
    check_vocabulary(seen, unseen, seen_file, unseen_file)
    return seen, unseen


def _parse_record(text: str, path: Path, line: int) -> Record:
    """The JSON syntax of a record; its content is the validator's."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise QKSError(f"not valid JSON ({e.msg})", path, line) from None
    # a number too long to convert, arrays nested too deep
    except (ValueError, RecursionError) as e:
        raise QKSError(f"not valid JSON ({str(e).split(':')[0]})", path, line) from None
    if not isinstance(obj, dict):
        raise QKSError("a record must be a JSON object", path, line)
    if extra := set(obj) - {"image", "positive", "negative"}:
        raise QKSError(
            f"unknown key(s) {sorted(extra)}; expected image, positive, negative", path, line
        )
    if not isinstance(obj.get("image"), str):
        raise QKSError("'image' must be a non-empty string", path, line)
    rest = obj.get("negative") == ALL_OTHERS
    lists = []
    for key in ("positive", "negative"):
        value = obj.get(key, [])
        if key == "negative" and rest:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise QKSError(f"'{key}' must be a list of non-empty strings", path, line)
        # interned: the same ~1,000 names on every line
        lists.append(tuple(sys.intern(v) for v in value))
    return Record(obj["image"], *lists, negative_rest=rest)


def iter_manifest(
    path: str | Path, validator: Validator | None = None
) -> Iterator[tuple[int, Record]]:
    """Yield (line number, record) of a JSONL manifest, each checked by `validator`."""
    path = Path(path)
    validator = validator or Validator()
    for i, text in iter_lines(path, "manifest"):
        rec = _parse_record(text, path, i)
        validator.check(rec, path, i)
        yield i, rec


def read_manifest(path: str | Path, vocabulary: Collection[str] | None = None) -> list[Record]:
    """Read and validate a JSONL manifest; with `vocabulary`, a label outside it is an error too."""
    return [rec for _, rec in iter_manifest(path, Validator(vocabulary))]


def _record_line(r: Record) -> str:
    negative = ALL_OTHERS if r.negative_rest else list(r.negative)
    record = {"image": r.image, "positive": list(r.positive), "negative": negative}
    return json.dumps(record) + "\n"


def write_manifest(path: str | Path, records: Iterable[Record]) -> None:
    atomic_write(path, "".join(_record_line(r) for r in records))


def label_matrix(
    records: Sequence[Record], vocabulary: Sequence[str], rest: Sequence[str] | None = None
) -> np.ndarray:
    """(N, C) int8: +1 positive, -1 verified negative, 0 unknown.

    Args:
        records: records validated against `vocabulary`.
        vocabulary: the C labels, in column order.
        rest: the labels that `"negative": "*"` makes negative (`scored_labels` of the split;
            default: `vocabulary`).
    """
    index = {label: j for j, label in enumerate(vocabulary)}
    if rest is None:
        rest = vocabulary
    rest_columns = [index[label] for label in rest]
    out = np.zeros((len(records), len(vocabulary)), dtype=np.int8)
    for i, rec in enumerate(records):
        if rec.negative_rest:
            out[i, rest_columns] = -1
        out[i, [index[label] for label in rec.negative]] = -1
        out[i, [index[label] for label in rec.positive]] = 1
    return out


def write_dataset(
    out_dir: str | Path,
    seen: Sequence[str],
    unseen: Sequence[str],
    splits: Mapping[str, Iterable[Record]],
) -> dict[str, SplitSummary]:
    """Write a dataset directory, all or nothing; returns the summary of each split's records.

    The files are streamed into a temporary sibling, renamed into `out_dir` when every file is
    complete. A record without a positive among its split's scored labels is counted, not written:
    the reference drops such images from training, and evaluation never scores them.
    """
    out_dir = Path(out_dir)
    check_vocabulary(seen, unseen, out_dir / "seen.txt", out_dir / "unseen.txt")
    validator = Validator(list(seen) + list(unseen))
    summaries = {}
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, records in splits.items():
            final = out_dir / f"{name}.jsonl"
            summary = SplitSummary(scored_labels(name, seen, unseen))
            with open(tmp / final.name, "w", encoding="utf-8") as f:
                for line, rec in enumerate(records, 1):
                    validator.check(rec, final, line)
                    if summary.add(rec):
                        f.write(_record_line(rec))
            if summary.images == summary.no_positive:
                raise QKSError("no images left to write", final)
            summaries[name] = summary
        write_labels(tmp / "seen.txt", seen)
        write_labels(tmp / "unseen.txt", unseen)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in [f"{s}.jsonl" for s in splits] + ["seen.txt", "unseen.txt"]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summaries


class Problem(NamedTuple):
    manifest: Path
    line: int
    image: Path
    reason: str


@dataclass
class DatasetReport:
    dataset_dir: Path
    seen: list[str]
    unseen: list[str]
    splits: dict[str, SplitSummary]
    # None: image files were not checked
    image_root: Path | None = None
    # image files that are missing or unreadable
    problems: list[Problem] = field(default_factory=list)


def check_dataset(
    dataset_dir: str | Path, image_root: str | Path | None = None, max_pixels: int | None = None
) -> DatasetReport:
    """Validate a dataset directory and count what it holds.

    A broken file raises QKSError; problems of image files (with `image_root`, decoded with
    stage one's decompression-bomb limit `max_pixels`; None: Pillow's) are collected in the report
    instead, so one run lists them all.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise QKSError("dataset directory not found", dataset_dir)
    seen, unseen = read_vocabulary(dataset_dir)
    report = DatasetReport(dataset_dir, seen, unseen, {})
    if image_root is not None:
        report.image_root = Path(image_root)
    validator = Validator(seen + unseen)
    for split in SPLITS:
        path = dataset_dir / f"{split}.jsonl"
        summary = SplitSummary(scored_labels(split, seen, unseen))
        report.splits[split] = summary
        for line, rec in iter_manifest(path, validator):
            summary.add(rec)
            if report.image_root is None:
                continue
            # decoded fully, as extraction does: PIL's verify() misses truncated JPEGs and
            # moderate bombs
            try:
                load_rgb(report.image_root / rec.image, max_pixels)
            except BadImage as e:
                reason = e.reason if e.reason == "missing" else f"unreadable ({e.reason})"
                report.problems.append(Problem(path, line, report.image_root / rec.image, reason))
        if not summary.images:
            raise QKSError("manifest has no images", path)
    return report
