"""`qks predict`: its inputs (label lists, image files and directories) and outputs.

The outputs are JSONL, CSV and HTML; the tagging itself is `qks_pipeline.predict.tagger.Tagger`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import click

from qks_pipeline.cli.options import DEVICE, EXISTING_FILE, NEW_DIR, NEW_FILE
from qks_pipeline.config import ExtractConfig
from qks_pipeline.errors import QKSError, shorten

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CSV_FIELDS = ["image", "rank", "label", "score", "in_top_k", "above_threshold", "skipped"]
MAX_PIXELS = "Larger images are skipped as decompression bombs (extract.max_pixels in stage one)."
# what `walk_images` counts as skipped
SKIPPED = "links to folders are not followed; folders and broken or looping links named like images"
POSITIVE = click.IntRange(min=1)


def read_label_lines(path: Path) -> list[str]:
    """One label a line (UTF-8) as raw entries; `predict.clean_labels` tidies them."""
    if not path.exists():
        raise QKSError("label file not found", path)
    if not path.is_file():
        raise QKSError("not a file (one label a line expected)", path)
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        message = f"label file is not UTF-8 text ({e.reason} at byte {e.start})"
        raise QKSError(message, path) from None


def find_images(
    inputs: Sequence[str | Path], echo: Callable[[str], None] | None = None
) -> list[Path]:
    """Image files named by `inputs`.

    A file as given (one that does not exist too: it is reported as skipped); a directory's image
    files sorted by their path under it, hidden ones (a leading '.' in the path) left out. What a
    directory holds but cannot be walked or read as an image file is counted, one note to `echo`.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)
            continue
        files, skipped = walk_images(item)
        if skipped and echo is not None:
            entries = "entry" if skipped == 1 else "entries"
            echo(f"note: {shorten(item)}: {skipped} {entries} skipped ({SKIPPED})")
        if not files:
            raise QKSError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under this directory", item
            )
        found += files
    if not found:
        raise QKSError("no images given")
    return found


def walk_images(folder: Path) -> tuple[list[Path], int]:
    """The image files under `folder`, sorted by their path under it, hidden ones left out; and how
    many entries were skipped: links to folders (not followed: they may loop) and image names that
    are no file (a folder named x.jpg, a broken or looping link)."""
    names = []
    skipped = 0
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if _hidden(name):
            continue
        if path.is_symlink() and path.is_dir():
            skipped += 1
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.is_file():
                names.append(name)
            else:
                skipped += 1
    return [folder / name for name in sorted(names)], skipped


def _hidden(name: str) -> bool:
    """Whether a relative path has a part with a leading '.'."""
    return any(part.startswith(".") for part in Path(name).parts)


def prediction_csv_rows(p: Any) -> list[dict[str, Any]]:
    """Long format: a row per label in a prediction's top-K or above the threshold.

    The rank is over all labels; a skipped image gets one row with its reason.
    """
    if p.skipped is not None:
        return [{"image": p.image, "skipped": p.skipped}]
    top = {label for label, _ in p.top}
    above = {label for label, _ in p.above}
    # sorted is stable: ties keep label order, as `predict.rank` does
    ranked = sorted(p.scores_by_label.items(), key=lambda kv: -kv[1])
    rows = []
    for r, (label, score) in enumerate(ranked, 1):
        if label not in top and label not in above:
            continue
        rows.append(
            {
                "image": p.image,
                "rank": r,
                "label": label,
                "score": round(score, 6),
                "in_top_k": int(label in top),
                "above_threshold": int(label in above),
                "skipped": "",
            }
        )
    return rows


@contextlib.contextmanager
def _output(path: Path) -> Iterator[TextIO]:
    """The file to stream into (written atomically), or stdout for '-'."""
    from qks_pipeline.atomic import atomic_stream

    if str(path) == "-":
        yield sys.stdout
    else:
        with atomic_stream(path) as f:
            yield f


def _labels(labels: str | None, labels_file: Path | None, checkpoint: Path) -> list[str]:
    """The labels given, else the ones the checkpoint was trained on (seen, then unseen)."""
    from qks_pipeline.predict.tagger import clean_labels, repeats_note
    from qks_pipeline.stage_two.checkpoint import read_config

    if labels is not None and labels_file is not None:
        raise click.UsageError("give at most one of --labels and --labels-file")
    if labels is not None:
        raw = labels.split(",")
    elif labels_file is not None:
        raw = read_label_lines(labels_file)
    else:
        raw = read_config(checkpoint).get("label_names")
        if not raw:
            raise click.UsageError(
                "give --labels or --labels-file (the checkpoint records no label list)"
            )
    names, dropped = clean_labels(raw)
    if dropped:
        click.echo(f"note: {repeats_note(dropped)}", err=True)
    return names


def _skip_note(name: str, reason: str) -> None:
    from tqdm import tqdm

    # above the progress bar, not through it
    tqdm.write(f"skipped {shorten(name)}: {reason}", file=sys.stderr)


def _write(
    predictions: Iterator[Any], out: Path, csv_path: Path | None, all_scores: bool, keep: bool
) -> tuple[list[Any], int, int]:
    """Stream the predictions into JSONL (and CSV); return (kept if `keep`, images, skipped)."""
    kept = []
    done = 0
    skipped = 0
    with (
        _output(out) as jsonl,
        _output(csv_path) if csv_path else contextlib.nullcontext() as table,
    ):
        writer = csv.DictWriter(table, CSV_FIELDS, lineterminator="\n") if table else None
        if writer:
            writer.writeheader()
        for p in predictions:
            jsonl.write(json.dumps(p.to_json(all_scores), ensure_ascii=False) + "\n")
            if writer:
                writer.writerows(prediction_csv_rows(p))
            if keep:
                kept.append(p)
            done += 1
            skipped += p.skipped is not None
        # a closed pipe (`| head -1`) is found here, not at exit
        jsonl.flush()
    return kept, done, skipped


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="A `qks train` output directory.",
)
@click.option(
    "--labels",
    help='Comma-separated labels, e.g. "dog, beach ball, sunset" [default: the trained ones].',
)
@click.option("--labels-file", type=click.Path(path_type=Path), help="Labels, one a line.")
@click.option(
    "--templates",
    type=EXISTING_FILE,
    help="Templates, one a line with '{}' [default: the checkpoint's].",
)
@click.option(
    "--top-k", default=5, show_default=True, type=POSITIVE, help="Labels listed per image."
)
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Score to list above.",
)
@click.option(
    "--out", default="-", show_default=True, type=NEW_FILE, help="JSONL predictions ('-': stdout)."
)
@click.option("--csv", "csv_path", type=NEW_FILE, help="Also write CSV (one row per listed label).")
@click.option(
    "--html", type=NEW_FILE, help="Also write a self-contained HTML page with thumbnails."
)
@click.option("--all-scores", is_flag=True, help="Add every label's score to each JSONL record.")
@click.option(
    "--batch-size", default=32, show_default=True, type=POSITIVE, help="Images per batch."
)
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Decoding processes.",
)
@DEVICE
@click.option(
    "--amp/--no-amp",
    default=False,
    show_default=True,
    help="float16 autocast of the backbone (CUDA).",
)
@click.option("--model", help="open_clip model name or config .json [default: the checkpoint's].")
@click.option(
    "--pretrained", help="CLIP weights file or open_clip tag [default: the checkpoint's]."
)
@click.option(
    "--max-pixels",
    default=ExtractConfig.max_pixels,
    show_default=True,
    type=POSITIVE,
    help=MAX_PIXELS,
)
@click.option("--cache-dir", type=NEW_DIR, help="Label-embedding cache directory.")
@click.option(
    "--no-label-cache", is_flag=True, help="Do not read or write cached label embeddings."
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar."
)
def predict_cmd(
    images: tuple[str, ...],
    checkpoint: Path,
    labels: str | None,
    labels_file: Path | None,
    templates: Path | None,
    top_k: int,
    threshold: float,
    out: Path,
    csv_path: Path | None,
    html: Path | None,
    all_scores: bool,
    batch_size: int,
    workers: int,
    device: str,
    amp: bool,
    model: str | None,
    pretrained: str | None,
    max_pixels: int,
    cache_dir: Path | None,
    no_label_cache: bool,
    progress: bool,
) -> None:
    """Tag IMAGES (files, or directories walked for image files) with any labels; JSONL out,
    CSV and HTML optional.

    Each record lists the top-K labels with sigmoid scores and every label above the threshold; an
    unreadable image is reported on stderr and recorded as skipped, and the others go on.
    """
    from qks_pipeline.predict.html_page import write_html
    from qks_pipeline.predict.tagger import Tagger

    names = _labels(labels, labels_file, checkpoint)
    files = find_images(images, partial(click.echo, err=True))
    # the label-embedding cache: a directory, True for the default one, False for none
    label_cache = False if no_label_cache else (cache_dir or True)
    tagger = Tagger.load(
        checkpoint,
        device,
        pretrained,
        model=model,
        templates=templates,
        cache_dir=label_cache,
        amp=amp,
        max_pixels=max_pixels,
    )
    predictions = tagger.iter_predict(
        files,
        names,
        top_k,
        threshold,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        on_skip=_skip_note,
    )
    try:
        kept, done, skipped = _write(predictions, out, csv_path, all_scores, keep=bool(html))
    # the reader of stdout went away (`| head -1`): SIGPIPE's status, quietly, as Unix tools
    except BrokenPipeError:
        # no second error when Python flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    if html:
        write_html(html, kept, threshold=threshold, subtitle=f"checkpoint {checkpoint}")
    _summarize(done, skipped, len(names), [out, csv_path, html])


def _summarize(done: int, skipped: int, num_labels: int, outputs: list[Path | None]) -> None:
    """One line on stderr: images tagged and skipped, and where the outputs went."""
    written = [path for path in outputs if path is not None]
    where = ", ".join("stdout" if str(path) == "-" else shorten(path) for path in written)
    click.echo(
        f"{done - skipped} image(s) tagged with {num_labels} labels, {skipped} skipped -> {where}",
        err=True,
    )
    if done == skipped:
        raise QKSError("no image could be read")


COMMANDS: list[click.Command] = [predict_cmd]
