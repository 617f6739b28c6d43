"""Data commands: `qks import FORMAT` (published releases -> a dataset directory) and `qks manifest check`."""

from __future__ import annotations

from pathlib import Path

import click

from qks_pipeline import importers
from qks_pipeline.errors import QKSError
from qks_pipeline.importers.hdf5 import LAYOUTS
from qks_pipeline.manifest import SPLITS, check_dataset, read_labels, read_manifest, read_vocabulary, write_dataset

DIR = click.Path(file_okay=False, path_type=Path)
FILE = click.Path(dir_okay=False, path_type=Path)
OUT = click.option(
    "--out", type=DIR, required=True, help="Dataset directory to write (train/test.jsonl, seen/unseen.txt)."
)


def _echo(report: importers.ImportReport) -> None:
    for line in report.lines():
        click.echo(line)


@click.group(name="import")
def import_group() -> None:
    """Write a dataset directory from a dataset's own published files (see data_manifests/README.md)."""


@import_group.command("manifest")
@click.option("--root", type=DIR, required=True, help="A ready dataset directory (train/test.jsonl, seen/unseen.txt).")
@OUT
def manifest(root: Path, out: Path) -> None:
    """A dataset directory already in this project's format (the bundled sample, your own): checked, then copied."""
    check_dataset(root)
    seen, unseen = read_vocabulary(root)
    splits = {split: read_manifest(root / f"{split}.jsonl") for split in SPLITS}
    counts = write_dataset(out, seen, unseen, splits)
    click.echo(
        f"wrote {out}: {len(seen)} seen + {len(unseen)} unseen labels; "
        + ", ".join(f"{split}: {n} images" for split, n in counts.items())
    )


@import_group.command("nuswide")
@click.option("--root", type=DIR, required=True, help="The NUS-WIDE release folder (ImageList/, NUS_WID_Tags/, ...).")
@OUT
def nuswide(root: Path, out: Path) -> None:
    """NUS-WIDE: 925 seen tags, 81 unseen concepts, every label annotated."""
    _echo(importers.import_nuswide(root, out))


@import_group.command("openimages")
@click.option("--root", type=DIR, required=True, help="The Open Images 2018_04 folder (class-descriptions.csv, ...).")
@click.option("--train-split", default="train", show_default=True, help="Release split written as train.jsonl.")
@click.option("--test-split", default="test", show_default=True, help="Release split written as test.jsonl.")
@OUT
def openimages(root: Path, train_split: str, test_split: str, out: Path) -> None:
    """Open Images v4: 7,186 trainable (seen) and 400 unseen classes, as display names."""
    _echo(importers.import_openimages(root, out, train_split, test_split))


@import_group.command("coco")
@click.option("--train-json", type=FILE, required=True, help="Instances JSON of the training images.")
@click.option("--test-json", type=FILE, required=True, help="Instances JSON of the test images.")
@click.option("--unseen", help="Unseen category names, comma-separated.")
@click.option("--unseen-file", type=FILE, help="Unseen category names, one a line.")
@click.option("--train-prefix", default="", help="Prepended to train file names (e.g. 'train2017/').")
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
    names = read_labels(unseen_file) if unseen_file else [n.strip() for n in unseen.split(",") if n.strip()]
    source = str(unseen_file) if unseen_file else "--unseen"
    _echo(importers.import_coco(train_json, test_json, names, out, train_prefix, test_prefix, source))


@import_group.command("reference-csv")
@click.option("--train-csv", type=FILE, required=True, help="The reference's train CSV (image_path,posi_labels,...).")
@click.option("--test-csv", type=FILE, required=True, help="The reference's test CSV.")
@click.option("--seen-file", type=FILE, required=True, help="Seen labels, one a line.")
@click.option("--unseen-file", type=FILE, required=True, help="Unseen labels, one a line.")
@click.option(
    "--strip-prefix", default="", help="Removed from the start of every image_path (e.g. 'datasets/OpenImages/')."
)
@OUT
def reference_csv(
    train_csv: Path, test_csv: Path, seen_file: Path, unseen_file: Path, strip_prefix: str, out: Path
) -> None:
    """The reference implementation's preprocessed CSVs (labels joined by '|')."""
    _echo(importers.import_reference_csv(train_csv, test_csv, seen_file, unseen_file, out, strip_prefix))


@import_group.command("hdf5")
@click.option("--train-h5", type=FILE, required=True, help="HDF5 file with <image>-labels datasets.")
@click.option("--train-names", type=FILE, required=True, help="Names of the training images, one a line.")
@click.option("--test-h5", type=FILE, required=True, help="HDF5 file with <image>-labels and <image>-labels_81.")
@click.option("--test-names", type=FILE, required=True, help="Names of the test images, one a line.")
@click.option("--seen-file", type=FILE, required=True, help="The seen tags in the order of the -labels vectors.")
@click.option("--unseen-file", type=FILE, required=True, help="The 81 concepts in the order of the -labels_81 vectors.")
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="flickr",
    show_default=True,
    help="flickr: 'a_0001_23.jpg' -> 'Flickr/a/0001_23.jpg'; path: the name is the path.",
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
    _echo(importers.import_hdf5(train_h5, train_names, test_h5, test_names, seen_file, unseen_file, out, layout))


@click.group(name="manifest")
def manifest_group() -> None:
    """Inspect dataset directories."""


@manifest_group.command("check")
@click.argument("dataset_dir", type=DIR)
@click.option("--images", type=DIR, help="Image root: also open and verify every image file.")
@click.pass_context
def check(ctx: click.Context, dataset_dir: Path, images: Path | None) -> None:
    """Validate DATASET_DIR and print its counts; exit code 1 when an image file is missing or unreadable."""
    if images is not None and not images.is_dir():
        raise QKSError("image root not found", images)
    report = check_dataset(dataset_dir, images)
    for line in report.summary_lines():
        click.echo(line)
    if report.problems:
        ctx.exit(1)


COMMANDS: list[click.Command] = [import_group, manifest_group]
