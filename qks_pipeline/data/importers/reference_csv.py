"""The reference implementation's preprocessed CSVs, one per split, labels joined by '|' (format:
data_manifests/README.md). Its label files may repeat a name (Open Images display names are not
unique): kept once. A CSV without negatives gives no label a scorable AP: the report says so, and
`negatives="rest"` writes `"negative": "*"`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from qks_pipeline.data.importers import ImportReport, csv_rows
from qks_pipeline.data.manifest import Record, check_image_path, check_vocabulary, read_lines
from qks_pipeline.errors import QKSError

# the negatives written: those the CSV lists, or every other label of the split
NEGATIVES = ("listed", "rest")
TEST_HEADER = "image_path,unseen_posi_labels,unseen_nega_labels,seen_posi_labels,seen_nega_labels"
# positive, negative
HEADERS = {"image_path,posi_labels,nega_labels": ((1,), (2,)), TEST_HEADER: ((3, 1), (4, 2))}


def read_label_file(path: Path, report: ImportReport) -> list[str]:
    """One label a line; a repeated label is kept once (noted in the report)."""
    lines = read_lines(path, "label file", unique=False)
    labels = list(dict.fromkeys(lines))
    if len(labels) < len(lines):
        report.notes.append(f"{path}: {len(lines) - len(labels)} repeated label line(s) merged")
    return labels


def _image_path(raw: str, strip_prefix: str, path: Path, line: int) -> str:
    """The manifest path of a CSV image path: '\\' -> '/', `strip_prefix` removed."""
    image = raw.strip().replace("\\", "/")
    if strip_prefix:
        prefix = strip_prefix.rstrip("/") + "/"
        if not image.startswith(prefix):
            raise QKSError(f"image path {image!r} does not start with {prefix!r}", path, line)
        image = image[len(prefix) :]
    if problem := check_image_path(image):
        raise QKSError(
            problem + " (use --strip-prefix to make it relative to the image root)", path, line
        )
    return image


def csv_records(
    path: Path,
    vocabulary: set[str],
    strip_prefix: str,
    split: str,
    negatives: str,
    report: ImportReport,
) -> Iterator[Record]:
    """Yield one record per CSV row; unknown labels and repeated images are errors naming the row's
    line."""
    # rows with a negative; image -> its first line
    listed, first, rest = 0, {}, negatives == "rest"
    rows = csv_rows(path, "CSV file")
    header = [h.strip() for h in next(rows, (1, []))[1]]
    if (columns := HEADERS.get(",".join(header))) is None:
        raise QKSError(
            f"unexpected header {','.join(header)!r}; expected {' or '.join(map(repr, HEADERS))}",
            path,
            1,
        )
    for line, row in rows:
        if len(row) != len(header):
            raise QKSError(f"expected {len(header)} fields, found {len(row)}", path, line)
        positive, negative = (
            tuple(dict.fromkeys(t.strip() for c in cols for t in row[c].split("|") if t.strip()))
            for cols in columns
        )
        if unknown := sorted((set(positive) | set(negative)) - vocabulary):
            raise QKSError(f"label(s) not in the seen or unseen file: {unknown[:5]}", path, line)
        image = _image_path(row[0], strip_prefix, path, line)
        if image in first:
            raise QKSError(
                f"image {image!r} listed twice (first on line {first[image]})", path, line
            )
        first[image], listed = line, listed + bool(negative)
        if set(positive) & set(negative):
            report.dropped[split, "positive and negative labels intersect"] += 1
        else:
            yield Record(image, positive, () if rest else negative, negative_rest=rest)
    if not listed and not rest:
        report.notes.append(
            f"{path}: the negative columns are empty on every row: no label has a verified negative, so none can be "
            "scored; --negatives rest makes every non-positive label of the split negative"
        )


def import_reference_csv(
    train_csv: str | Path,
    test_csv: str | Path,
    seen_file: str | Path,
    unseen_file: str | Path,
    out: str | Path,
    strip_prefix: str = "",
    negatives: str = "listed",
) -> ImportReport:
    """Write a dataset directory from the reference's train and test CSVs and its seen/unseen label
    files."""
    assert negatives in NEGATIVES, negatives
    report = ImportReport(Path(out))
    seen, unseen = (
        read_label_file(Path(seen_file), report),
        read_label_file(Path(unseen_file), report),
    )
    check_vocabulary(seen, unseen, Path(seen_file), Path(unseen_file))
    vocabulary = set(seen) | set(unseen)
    splits = {
        split: csv_records(Path(csv_file), vocabulary, strip_prefix, split, negatives, report)
        for split, csv_file in (("train", train_csv), ("test", test_csv))
    }
    return report.write(seen, unseen, splits)
