"""The reference implementation's preprocessed CSVs (format: data_manifests/README.md).

One CSV per split, labels joined by '|'. Its label files may repeat a name (Open Images display
names are not unique): kept once. A CSV without negatives gives no label a scorable AP: the report
says so, and `negatives="rest"` writes `"negative": "*"`.
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
# header -> (the positive columns, the negative columns)
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
        hint = " (use --strip-prefix to make it relative to the image root)"
        raise QKSError(problem + hint, path, line)
    return image


def _labels(row: list[str], columns: tuple[int, ...]) -> tuple[str, ...]:
    """The labels of `row`'s `columns`, split at '|', stripped, each once in order."""
    labels = []
    for column in columns:
        labels += [label.strip() for label in row[column].split("|") if label.strip()]
    return tuple(dict.fromkeys(labels))


def csv_records(
    path: Path,
    vocabulary: set[str],
    strip_prefix: str,
    split: str,
    negatives: str,
    report: ImportReport,
) -> Iterator[Record]:
    """One record per CSV row; unknown labels and repeated images are errors naming the line."""
    rest = negatives == "rest"
    # rows with a negative
    listed = 0
    # image -> its first line
    first = {}
    rows = csv_rows(path, "CSV file")
    header = [h.strip() for h in next(rows, (1, []))[1]]
    columns = HEADERS.get(",".join(header))
    if columns is None:
        expected = " or ".join(map(repr, HEADERS))
        raise QKSError(f"unexpected header {','.join(header)!r}; expected {expected}", path, 1)
    positive_columns, negative_columns = columns
    for line, row in rows:
        if len(row) != len(header):
            raise QKSError(f"expected {len(header)} fields, found {len(row)}", path, line)
        positive = _labels(row, positive_columns)
        negative = _labels(row, negative_columns)
        if unknown := sorted((set(positive) | set(negative)) - vocabulary):
            raise QKSError(f"label(s) not in the seen or unseen file: {unknown[:5]}", path, line)
        image = _image_path(row[0], strip_prefix, path, line)
        if image in first:
            raise QKSError(
                f"image {image!r} listed twice (first on line {first[image]})", path, line
            )
        first[image] = line
        listed += bool(negative)
        if set(positive) & set(negative):
            report.dropped[split, "positive and negative labels intersect"] += 1
        else:
            yield Record(image, positive, () if rest else negative, negative_rest=rest)
    if not listed and not rest:
        report.notes.append(
            f"{path}: the negative columns are empty on every row: no label has a verified "
            "negative, so none can be scored; --negatives rest makes every non-positive label "
            "of the split negative"
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
    """Write a dataset directory from the reference's train and test CSVs and its label files.

    Args:
        train_csv: the train split's CSV.
        test_csv: the test split's CSV.
        seen_file: the seen labels, one a line (a repeated one is kept once).
        unseen_file: the unseen labels, one a line.
        out: the dataset directory to write.
        strip_prefix: removed from every image path, making it relative to the image root.
        negatives: "listed" (the CSV's negatives) or "rest" (every other label of the split).
    """
    assert negatives in NEGATIVES, negatives
    report = ImportReport(Path(out))
    seen = read_label_file(Path(seen_file), report)
    unseen = read_label_file(Path(unseen_file), report)
    check_vocabulary(seen, unseen, Path(seen_file), Path(unseen_file))
    vocabulary = set(seen) | set(unseen)
    splits = {}
    for split, csv_file in (("train", train_csv), ("test", test_csv)):
        records = csv_records(Path(csv_file), vocabulary, strip_prefix, split, negatives, report)
        splits[split] = records
    return report.write(seen, unseen, splits)
