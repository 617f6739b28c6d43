"""Data commands: `qks import FORMAT` (published files -> a dataset directory), `qks manifest`."""

from __future__ import annotations

from pathlib import Path

import click

from qks_pipeline.cli.options import EXISTING_DIR, EXISTING_FILE, NEW_DIR, params_options
from qks_pipeline.config import Params
from qks_pipeline.data.importers import import_manifest
from qks_pipeline.data.importers.coco import import_coco
from qks_pipeline.data.importers.hdf5 import LAYOUTS, import_hdf5
from qks_pipeline.data.importers.nuswide import import_nuswide
from qks_pipeline.data.importers.openimages import import_openimages
from qks_pipeline.data.importers.reference_csv import NEGATIVES, import_reference_csv
from qks_pipeline.data.manifest import DatasetReport, check_dataset, quoted, read_labels
from qks_pipeline.errors import shorten


def required(name: str, text: str, kind: click.Path = EXISTING_FILE):
    """A required option taking a path (an existing file by default)."""
    return click.option(name, type=kind, required=True, help=text)


def choice(name: str, values: tuple[str, ...], text: str):
    """An option taking one of `values`, the first by default."""
    return click.option(
        name, type=click.Choice(values), default=values[0], show_default=True, help=text
    )


OUT = required("--out", "Dataset directory to write (train/test.jsonl, seen/unseen.txt).", NEW_DIR)
# image problems printed by `manifest check`; the report keeps them all
MAX_LISTED = 20


@click.group(name="import")
def import_group() -> None:
    """Write a dataset directory from a dataset's own published files
    (see data_manifests/README.md)."""


@import_group.command("manifest")
@required("--root", "A ready dataset directory (train/test.jsonl, seen/unseen.txt).", EXISTING_DIR)
@OUT
def manifest(root: Path, out: Path) -> None:
    """A dataset directory already in this project's format (the bundled sample, your own):
    checked, then copied."""
    click.echo("\n".join(import_manifest(root, out).lines()))


@import_group.command("nuswide")
@required("--root", "The NUS-WIDE release folder (ImageList/, NUS_WID_Tags/, ...).", EXISTING_DIR)
@OUT
def nuswide(root: Path, out: Path) -> None:
    """NUS-WIDE: 925 seen tags, 81 unseen concepts, every label annotated."""
    click.echo("\n".join(import_nuswide(root, out).lines()))


@import_group.command("openimages")
@required("--root", "The Open Images release folder, or its 2018_04 subfolder.", EXISTING_DIR)
@click.option(
    "--images", type=EXISTING_DIR, help="Image root: locate each image (<split>/[NN/]<id>.jpg)."
)
@click.option(
    "--train-split",
    default="train",
    show_default=True,
    help="Release split written as train.jsonl.",
)
@click.option(
    "--test-split", default="test", show_default=True, help="Release split written as test.jsonl."
)
@OUT
def openimages(
    root: Path, images: Path | None, train_split: str, test_split: str, out: Path
) -> None:
    """Open Images v4: 7,186 trainable (seen) and 400 unseen classes, matched by MID,
    written as display names."""
    report = import_openimages(
        root, out, train_split=train_split, test_split=test_split, images=images
    )
    click.echo("\n".join(report.lines()))


@import_group.command("coco")
@required("--train-json", "Instances JSON of the training images.")
@required("--test-json", "Instances JSON of the test images.")
@click.option("--unseen", help="Unseen category names, comma-separated.")
@click.option("--unseen-file", type=EXISTING_FILE, help="Unseen category names, one a line.")
@click.option(
    "--train-prefix", default="", help="Prepended to train file names (e.g. 'train2017/')."
)
@click.option("--test-prefix", default="", help="Prepended to test file names (e.g. 'val2017/').")
@OUT
def coco(
    train_json: Path,
    test_json: Path,
    unseen: str | None,
    unseen_file: Path | None,
    train_prefix: str,
    test_prefix: str,
    out: Path,
) -> None:
    """COCO: categories present are positive, all others verified negatives."""
    if (unseen is None) == (unseen_file is None):
        raise click.UsageError("give exactly one of --unseen and --unseen-file")
    if unseen_file:
        names = read_labels(unseen_file)
    else:
        names = [n.strip() for n in unseen.split(",") if n.strip()]
    report = import_coco(
        train_json,
        test_json,
        names,
        out,
        train_prefix=train_prefix,
        test_prefix=test_prefix,
        unseen_source=str(unseen_file or "--unseen"),
    )
    click.echo("\n".join(report.lines()))


@import_group.command("reference-csv")
@required("--train-csv", "The reference's train CSV (image_path,posi_labels,...).")
@required("--test-csv", "The reference's test CSV.")
@required("--seen-file", "Seen labels, one a line.")
@required("--unseen-file", "Unseen labels, one a line.")
@click.option(
    "--strip-prefix",
    default="",
    help="Removed from the start of every image_path (e.g. 'data/oi/').",
)
@choice(
    "--negatives",
    NEGATIVES,
    "listed: the CSV's negative columns; rest: every other label the split scores.",
)
@OUT
def reference_csv(
    train_csv: Path,
    test_csv: Path,
    seen_file: Path,
    unseen_file: Path,
    strip_prefix: str,
    negatives: str,
    out: Path,
) -> None:
    """The reference implementation's preprocessed CSVs (labels joined by '|')."""
    report = import_reference_csv(
        train_csv,
        test_csv,
        seen_file,
        unseen_file,
        out,
        strip_prefix=strip_prefix,
        negatives=negatives,
    )
    click.echo("\n".join(report.lines()))


@import_group.command("hdf5")
@required("--train-h5", "HDF5 file with <image>-labels datasets.")
@required("--train-names", "Names of the training images, one a line.")
@required("--test-h5", "HDF5 file with <image>-labels and <image>-labels_81.")
@required("--test-names", "Names of the test images, one a line.")
@required("--seen-file", "The seen tags in the order of the -labels vectors.")
@required("--unseen-file", "The 81 concepts in the order of the -labels_81 vectors.")
@choice(
    "--layout",
    LAYOUTS,
    "flickr: 'a_0001_23.jpg' -> 'Flickr/a/0001_23.jpg'; path: the name is the path.",
)
@OUT
def hdf5(
    train_h5: Path,
    train_names: Path,
    test_h5: Path,
    test_names: Path,
    seen_file: Path,
    unseen_file: Path,
    layout: str,
    out: Path,
) -> None:
    """BiAM/MKT-style HDF5 label files (NUS-WIDE)."""
    report = import_hdf5(
        train_h5, train_names, test_h5, test_names, seen_file, unseen_file, out, layout=layout
    )
    click.echo("\n".join(report.lines()))


@click.group(name="manifest")
def manifest_group() -> None:
    """Inspect dataset directories."""


@manifest_group.command("check")
@click.argument("dataset_dir", type=EXISTING_DIR)
@click.option(
    "--images", type=EXISTING_DIR, help="Image root: also open and verify every image file."
)
@params_options("extract")
@click.pass_context
def check(ctx: click.Context, dataset_dir: Path, images: Path | None, params: Params) -> None:
    """Validate DATASET_DIR and print its counts; exit code 1 when an image file is missing
    or unreadable.

    Images are decoded as `qks extract` decodes them, with its decompression-bomb limit
    (`--set extract.max_pixels=N`).
    """
    report = check_dataset(dataset_dir, images, params.extract.max_pixels)
    click.echo("\n".join(report_lines(report)))
    if report.problems:
        ctx.exit(1)


def report_lines(report: DatasetReport) -> list[str]:
    """Counts per split, the scored labels without a positive or a negative, image problems."""
    out = [f"{report.dataset_dir}: {len(report.seen)} seen + {len(report.unseen)} unseen labels"]
    for name, s in report.splits.items():
        scope = "seen" if name == "train" else "seen + unseen"
        low, label = s.min_positives()
        out.append(f"  {name}: {s.images} images, {s.no_positive} without a positive {scope} label")
        out.append(f"    fewest positives of a {scope} label: {low} ({quoted(label)})")
        without = {
            "positive": s.labels_without_positive(),
            "negative": s.labels_without_negative(),
        }
        for what, labels in without.items():
            line = f"    {len(labels)} {scope} label(s) without a {what}"
            if labels:
                line += f": {shorten(labels[:10])}"
            out.append(line)
    if report.image_root is None:
        return out + ["image files not checked (no image root given)"]
    out.append(f"image files under {report.image_root}: {len(report.problems)} problem(s)")
    for p in report.problems[:MAX_LISTED]:
        out.append(f"  {shorten(p.image)}: {p.reason} ({shorten(p.manifest)}:{p.line})")
    if len(report.problems) > MAX_LISTED:
        out.append(f"  ... and {len(report.problems) - MAX_LISTED} more")
    return out


COMMANDS: list[click.Command] = [import_group, manifest_group]
