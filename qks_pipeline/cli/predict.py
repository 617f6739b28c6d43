"""`qks predict`: tag new images with any label list, using a trained checkpoint and the CLIP backbone it names."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import click

from qks_pipeline.errors import QKSError

NEW_PATH = click.Path(dir_okay=False, path_type=Path)


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO | None]:
    """The file to stream into (written atomically), stdout for '-', or None."""
    from qks_pipeline.atomic import atomic_stream

    if path is None:
        yield None
    elif str(path) == "-":
        yield sys.stdout
    else:
        with atomic_stream(path) as f:
            yield f


def _labels(labels: str | None, labels_file: Path | None) -> list[str]:
    from qks_pipeline.predict import clean_labels, parse_labels, read_label_file

    if (labels is None) == (labels_file is None):
        raise click.UsageError("give exactly one of --labels and --labels-file")
    raw = parse_labels(labels) if labels is not None else read_label_file(labels_file)
    names, dropped = clean_labels(raw)
    if dropped:
        click.echo(f"note: duplicate label(s) removed: {', '.join(dict.fromkeys(dropped))}", err=True)
    return names


def _skip_note(name: str, reason: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)  # above the progress bar, not through it


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="A `qks train` (or `qks import-checkpoint`) output directory.")  # fmt: skip
@click.option("--labels", help='Comma-separated labels, e.g. "dog, beach ball, sunset".')
@click.option("--labels-file", type=click.Path(path_type=Path), help="Labels, one a line.")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt templates, one a line with '{}' [default: the built-in 85-template pool].")  # fmt: skip
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Labels listed per image.")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="List every label whose sigmoid score is above this.")  # fmt: skip
@click.option("--out", default="-", show_default=True, type=NEW_PATH, help="JSONL predictions ('-': stdout).")
@click.option("--csv", "csv_path", type=NEW_PATH, help="Also write CSV (one row per listed label).")
@click.option("--html", type=NEW_PATH, help="Also write a self-contained HTML page with thumbnails.")
@click.option("--all-scores", is_flag=True, help="Add every label's score to each JSONL record.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Processes decoding images (0: the main process).")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda[:N]")
@click.option("--amp/--no-amp", default=False, show_default=True, help="float16 autocast (CUDA only).")
@click.option("--model", help="open_clip model name or config .json [default: the checkpoint's].")
@click.option("--pretrained", help="CLIP weights file or open_clip tag [default: the checkpoint's].")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Label-embedding cache [default: $QKS_CACHE_DIR/label_embeddings or ~/.cache/qks/...].")  # fmt: skip
@click.option("--no-label-cache", is_flag=True, help="Do not read or write cached label embeddings.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def predict_cmd(images, checkpoint, labels, labels_file, templates, top_k, threshold, out, csv_path, html, all_scores,
                batch_size, workers, device, amp, model, pretrained, cache_dir, no_label_cache,
                progress) -> None:  # fmt: skip
    """Tag IMAGES (files, or directories walked for image files) with any labels; JSONL out, CSV and HTML optional.

    Each record lists the top-K labels with sigmoid scores and every label above the threshold; an unreadable image
    is reported on stderr and recorded as skipped, and the others go on.
    """
    from qks_pipeline.predict import CSV_FIELDS, Tagger, csv_rows, find_images
    from qks_pipeline.report import write_html

    names = _labels(labels, labels_file)
    files = find_images(images)
    tagger = Tagger.load(checkpoint, device, pretrained, model=model, templates=templates,
                         cache_dir=False if no_label_cache else (cache_dir or True), amp=amp)  # fmt: skip
    kept, done, skipped = [], 0, 0
    with _output(out) as jsonl, _output(csv_path) as table:
        writer = csv.DictWriter(table, CSV_FIELDS, lineterminator="\n") if table else None
        if writer:
            writer.writeheader()
        for p in tagger.iter_predict(files, names, top_k, threshold, batch_size=batch_size, workers=workers,
                                     progress=progress, on_skip=_skip_note):  # fmt: skip
            jsonl.write(json.dumps(p.to_json(all_scores), ensure_ascii=False) + "\n")
            if writer:
                writer.writerows(csv_rows(p))
            kept += [p] if html else []
            done, skipped = done + 1, skipped + (p.skipped is not None)
    if html:
        write_html(html, kept, threshold=threshold, subtitle=f"checkpoint {checkpoint}")
    where = ", ".join("stdout" if str(p) == "-" else str(p) for p in (out, csv_path, html) if p is not None)
    click.echo(f"{done - skipped} image(s) tagged with {len(names)} labels, {skipped} skipped -> {where}", err=True)
    if done == skipped:
        raise QKSError("no image could be read")


COMMANDS: list[click.Command] = [predict_cmd]
