"""Importers: a dataset's published files -> a dataset directory (data_manifests/README.md).

One module per format; each exposes one `import_*` function that writes `train.jsonl`, `test.jsonl`,
`seen.txt` and `unseen.txt` through `ImportReport.write` (`manifest.write_dataset`: validated, all
or nothing) and returns the report. This module holds what they share, and the importer of a dataset
directory already in this project's format.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qks_pipeline.data.manifest import (
    SPLITS,
    Record,
    Validator,
    iter_manifest,
    read_vocabulary,
    require_file,
    write_dataset,
)
from qks_pipeline.errors import QKSError


@dataclass
class ImportReport:
    out_dir: Path
    written: dict[str, int] = field(default_factory=dict)  # split -> images written
    dropped: Counter = field(default_factory=Counter)  # (split, reason) -> images not written
    # anything else the user should know (e.g. renamed labels)
    notes: list[str] = field(default_factory=list)
    seen: int = 0  # labels in seen.txt
    unseen: int = 0  # labels in unseen.txt

    def write(
        self, seen: Sequence[str], unseen: Sequence[str], splits: Mapping[str, Iterable[Record]]
    ) -> ImportReport:
        """Write the dataset (`manifest.write_dataset`: all or nothing); count images left out."""
        for split, summary in write_dataset(self.out_dir, seen, unseen, splits).items():
            self.written[split] = summary.images - summary.no_positive
            self.dropped[split, "no positive label"] += summary.no_positive
        self.seen = len(seen)
        self.unseen = len(unseen)
        return self

    def lines(self) -> list[str]:
        out = [f"wrote {self.out_dir}: {self.seen} seen + {self.unseen} unseen labels"]
        for split, n in self.written.items():
            line = f"  {split}: {n} images written"
            drops = [
                f"{count} ({reason})"
                for (s, reason), count in sorted(self.dropped.items())
                if s == split and count
            ]
            if drops:
                line += f", dropped {', '.join(drops)}"
            out.append(line)
        return out + [f"  note: {note}" for note in self.notes]


def csv_rows(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of each non-blank row of a UTF-8 CSV file (a BOM allowed)."""
    with open(require_file(path, what), encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        try:
            for row in rows:
                if "".join(row).strip():
                    yield rows.line_num, row
        except UnicodeDecodeError:
            raise QKSError("not UTF-8 text", path, rows.line_num + 1) from None


def import_manifest(root: str | Path, out: str | Path) -> ImportReport:
    """Check, then copy, a dataset directory already in this format (the bundled sample, yours)."""
    seen, unseen = read_vocabulary(root)
    # one for both splits: an image in both is an error naming the source
    validator = Validator(seen + unseen)
    splits = {}
    for split in SPLITS:
        records = iter_manifest(Path(root) / f"{split}.jsonl", validator)
        splits[split] = [record for _, record in records]
    return ImportReport(Path(out)).write(seen, unseen, splits)
