"""What every importer shares: the report it returns (and writes through), readers for line-aligned text files, and
the importer of a dataset directory already in this project's format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qks_pipeline.errors import QKSError
from qks_pipeline.manifest import SPLITS, Record, Validator, iter_manifest, read_vocabulary, write_dataset


@dataclass
class ImportReport:
    out_dir: Path
    written: dict[str, int] = field(default_factory=dict)  # split -> images written
    dropped: Counter = field(default_factory=Counter)  # (split, reason) -> images not written
    notes: list[str] = field(default_factory=list)  # anything else the user should know (e.g. renamed labels)
    seen: int = 0  # labels in seen.txt
    unseen: int = 0  # labels in unseen.txt

    def drop(self, split: str, reason: str) -> None:
        self.dropped[split, reason] += 1

    def write(self, seen: Sequence[str], unseen: Sequence[str], splits: Mapping[str, Iterable[Record]]) -> ImportReport:
        """Write the dataset (`manifest.write_dataset`, all or nothing) and count the images it left out."""
        for split, summary in write_dataset(self.out_dir, seen, unseen, splits).items():
            self.written[split] = summary.images - summary.no_positive
            self.dropped[split, "no positive label"] += summary.no_positive
        self.seen, self.unseen = len(seen), len(unseen)
        return self

    def lines(self) -> list[str]:
        out = [f"wrote {self.out_dir}: {self.seen} seen + {self.unseen} unseen labels"]
        for split, n in self.written.items():
            drops = [f"{c} ({reason})" for (s, reason), c in sorted(self.dropped.items()) if s == split and c]
            out.append(f"  {split}: {n} images written" + (f", dropped {', '.join(drops)}" if drops else ""))
        return out + [f"  note: {note}" for note in self.notes]


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise QKSError(f"{what} not found", path)
    return path


def iter_aligned_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, stripped text) of a file whose n-th line belongs to the n-th item of another file.

    CRLF line ends and surrounding spaces are removed; empty lines at the end are ignored, but an empty line followed by
    more data is an error (it would shift every later line against its partner).
    """
    require_file(path, "file")
    blank = None
    with open(path, encoding="utf-8-sig", newline=None) as f:
        for i, text in enumerate(f, 1):
            text = text.strip()
            if not text:
                blank = blank or i
                continue
            if blank is not None:
                raise QKSError("empty line inside the file (lines must match another file one to one)", path, blank)
            yield i, text


def read_aligned_lines(path: Path, unique: bool = False) -> list[str]:
    """All lines of `iter_aligned_lines`; with `unique`, a repeated line is an error."""
    out, first = [], {}
    for i, text in iter_aligned_lines(path):
        if unique and text in first:
            raise QKSError(f"{text!r} listed twice (first on line {first[text]})", path, i)
        first[text] = i
        out.append(text)
    if not out:
        raise QKSError("file is empty", path)
    return out


def read_binary_column(path: Path, count: int, partner: Path) -> list[bool]:
    """A file of one 0/1 a line, `count` lines long (the length of `partner`, the list it annotates)."""
    values = []
    for i, text in iter_aligned_lines(path):
        if text not in ("0", "1"):
            raise QKSError(f"expected 0 or 1, found {text!r}", path, i)
        values.append(text == "1")
    if len(values) != count:
        raise QKSError(f"{len(values)} lines, but {partner} lists {count} images", path)
    return values


def import_manifest(root: str | Path, out: str | Path) -> ImportReport:
    """A dataset directory already in this format (the bundled sample, your own): checked, then copied."""
    seen, unseen = read_vocabulary(root)
    validator = Validator(seen + unseen)  # one for both splits: an image in both is an error naming the source
    splits = {s: [rec for _, rec in iter_manifest(Path(root) / f"{s}.jsonl", validator)] for s in SPLITS}
    return ImportReport(Path(out)).write(seen, unseen, splits)
