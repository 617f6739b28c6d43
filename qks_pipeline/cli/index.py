"""The query-index commands: `qks index` builds it once per checkpoint and collection; `qks tag`,
`qks search` and `qks serve` score it against any label list (`qks evaluate --index` is in
`cli.stage_two`). The work is in `qks_pipeline.index`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from qks_pipeline.cli.options import DEVICE, EXISTING_FILE, NEW_DIR, NEW_FILE, STORE, params_options
from qks_pipeline.cli.predict import _write, read_label_lines
from qks_pipeline.config import Params
from qks_pipeline.errors import QKSError

POSITIVE = click.IntRange(min=1)
INDEX = click.option(
    "--index", "index_path", required=True, type=STORE, help="A query index (`qks index`)."
)


def _label_source(f):
    """The options of the commands that embed new labels, as `qks predict` embeds them."""
    options = [
        click.option(
            "--checkpoint",
            type=click.Path(file_okay=False, path_type=Path),
            help="The checkpoint the index was built with [default: where the index recorded it].",
        ),
        click.option("--model", help="open_clip model name or config .json [default: recorded]."),
        click.option(
            "--pretrained", help="CLIP weights file or open_clip tag [default: recorded]."
        ),
        click.option(
            "--templates", type=EXISTING_FILE, help="Templates [default: the checkpoint's]."
        ),
        click.option("--cache-dir", type=NEW_DIR, help="Label-embedding cache directory."),
        click.option("--no-label-cache", is_flag=True, help="Do not read or write cached labels."),
        DEVICE,
        params_options("index"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _open(index_class: Any, index_path: str | Path, params: Params, o: dict[str, Any]) -> Any:
    """`Index.open` (the class is imported by each command: DVC's dependencies follow a command's
    own imports) with the label-source options of `_label_source`."""
    cache = False if o["no_label_cache"] else (o["cache_dir"] or True)
    how = {k: o[k] for k in ("model", "pretrained", "templates")}
    return index_class.open(
        index_path,
        checkpoint=o["checkpoint"],
        device=o["device"],
        max_labels=params.index.max_labels,
        cache_dir=cache,
        **how,
    )


def _given_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    if (labels is None) == (labels_file is None):
        raise click.UsageError("give one of --labels and --labels-file")
    return labels.split(",") if labels is not None else read_label_lines(labels_file)


@click.command("index")
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A `qks train` (or `qks import-checkpoint`) output directory.",
)
@click.option(
    "--cache", "cache_path", required=True, type=STORE, help="The feature store to index."
)
@click.option("--out", required=True, type=STORE, help="The index to write: path or URL.")
@params_options("index")
@DEVICE
@click.option("--overwrite", is_flag=True, help="Rebuild the index even if it is complete.")
@click.option(
    "--replace-stale",
    is_flag=True,
    help="Rebuild an index built otherwise (checkpoint, store, precision); resume one built the "
    "same.",
)
@click.option("--cluster", help="Run on dask: local:N or tcp://HOST:PORT, one task per shard.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")
def index_cmd(
    checkpoint: Path,
    cache_path: str | Path,
    out: str | Path,
    params: Params,
    device: str,
    overwrite: bool,
    replace_stale: bool,
    cluster: str | None,
    progress: bool,
) -> None:
    """Run the head once per cached image and store its query outputs z: then any vocabulary is one
    matrix product away (`qks tag`, `qks search`, `qks serve`, `qks evaluate --index`). Rerun to
    resume."""
    from qks_pipeline.index.build import build_index

    how = {"overwrite": overwrite, "replace_stale": replace_stale, "cluster": cluster}
    result = build_index(
        checkpoint, cache_path, out, params=params.index, device=device, progress=progress, **how
    )
    if result.computed:
        speed = f"{result.images_per_second:.1f} images/s"
        click.echo(f"{out}: {result.computed} images in {result.shards_written} shard(s), {speed}")
    else:
        click.echo(f"{out}: already complete ({result.images} images), nothing to do")


@click.command("tag")
@INDEX
@click.option("--labels", help='Comma-separated labels, e.g. "dog, beach ball, sunset".')
@click.option("--labels-file", type=click.Path(path_type=Path), help="Labels, one a line.")
@click.option("--top-k", default=5, show_default=True, type=POSITIVE, help="Labels per image.")
@click.option(
    "--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="Score."
)
@click.option("--out", default="-", show_default=True, type=NEW_FILE, help="JSONL ('-': stdout).")
@click.option("--csv", "csv_path", type=NEW_FILE, help="Also write CSV (one row per listed label).")
@click.option("--all-scores", is_flag=True, help="Add every label's score to each JSONL record.")
@_label_source
def tag_cmd(
    index_path: str | Path,
    labels: str | None,
    labels_file: Path | None,
    top_k: int,
    threshold: float,
    out: Path,
    csv_path: Path | None,
    all_scores: bool,
    **o: Any,
) -> None:
    """Tag every image of the index with any labels: per image the top-K labels and those above the
    threshold, as `qks predict` writes them. Streams: memory does not grow with the images."""
    from qks_pipeline.index.index import Index

    index = _open(Index, index_path, o.pop("params"), o)
    given = _given_labels(labels, labels_file)
    predictions = index.tag(given, top_k, threshold)
    try:
        _, done, skipped = _write(predictions, out, csv_path, all_scores, keep=False)
    # the reader of stdout went away (`| head -1`): SIGPIPE's status, quietly, as Unix tools
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    where = ", ".join("stdout" if str(p) == "-" else str(p) for p in (out, csv_path) if p)
    click.echo(f"{done - skipped} image(s) tagged, {skipped} unreadable -> {where}", err=True)
    if done == skipped:
        raise QKSError("no image of the index could be tagged (all unreadable)", index_path)


@click.command("search")
@INDEX
@click.argument("labels", nargs=-1, required=True)
@click.option("--top", default=10, show_default=True, type=POSITIVE, help="Images to list.")
@click.option("--out", default="-", show_default=True, type=NEW_FILE, help="JSONL ('-': stdout).")
@click.option("--html", type=NEW_FILE, help="Also write a self-contained gallery page.")
@click.option(
    "--images",
    type=click.Path(file_okay=False, path_type=Path),
    help="Image root the index's paths are relative to (the gallery's thumbnails).",
)
@click.option(
    "--tags", default=5, show_default=True, type=POSITIVE, help="Top tags per image in the gallery."
)
@_label_source
def search_cmd(
    index_path: str | Path,
    labels: tuple[str, ...],
    top: int,
    out: Path,
    html: Path | None,
    images: Path | None,
    tags: int,
    **o: Any,
) -> None:
    """The images of the index that score highest for LABEL (with several labels: for all of them,
    the lowest of their scores), best first, as JSONL; --html a gallery."""
    from qks_pipeline.atomic import atomic_stream
    from qks_pipeline.index.gallery import write_gallery
    from qks_pipeline.index.index import Index

    index = _open(Index, index_path, o.pop("params"), o)
    hits = index.search(list(labels), top)
    lines = [
        json.dumps({"rank": r, **h.to_json()}, ensure_ascii=False) for r, h in enumerate(hits, 1)
    ]
    text = "".join(line + "\n" for line in lines)
    if str(out) == "-":
        click.echo(text, nl=False)
    else:
        with atomic_stream(out) as f:
            f.write(text)
    if html:
        # each image's top tags over the searched labels and the index's own
        vocabulary = list(dict.fromkeys([*labels, *index.label_names]))
        tagged = index.tag_rows(vocabulary, [hit.row for hit in hits], top_k=tags)
        where = f"index {index_path}"
        write_gallery(html, list(labels), hits, tagged, images=images, subtitle=where)
    click.echo(f"{len(hits)} image(s) found for {' AND '.join(labels)}", err=True)


@click.command("serve")
@INDEX
@click.option(
    "--images",
    required=True,
    type=click.Path(path_type=Path),
    help="Image root the index's paths are relative to (the only files served).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--top", default=24, show_default=True, type=POSITIVE, help="Images per search.")
@_label_source
def serve_cmd(
    index_path: str | Path, images: Path, host: str, port: int, top: int, **o: Any
) -> None:
    """A local web page over the index: type labels, see the best-matching images with scores;
    click one to see its top tags. Needs the serve extra: pip install 'qks_pipeline[serve]'."""
    from qks_pipeline.index.index import Index
    from qks_pipeline.index.serve import serve

    index = _open(Index, index_path, o.pop("params"), o)
    serve(index, images, host, port, top, echo=lambda line: click.echo(line, err=True))


COMMANDS: list[click.Command] = [index_cmd, tag_cmd, search_cmd, serve_cmd]
