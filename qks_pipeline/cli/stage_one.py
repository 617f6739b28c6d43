"""Stage-one commands: `qks extract`, `qks embed-labels` and the `qks cache` group (info, verify, HDF5 interop).

Options given on the command line override the `backbone` / `extract` / `labels` sections of `--params`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import click
import dask

from qks_pipeline.config import load_params
from qks_pipeline.storage import StoreParam

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
NEW_PATH = click.Path(path_type=Path)
STORE, EXISTING_STORE = StoreParam(), StoreParam(exists=True)  # a local directory or a URL (s3://bucket/train.zarr)


def _override(section: Any, **values: Any) -> Any:
    """A copy of a params section with every option the user gave (not None) replacing the file's value."""
    return dataclasses.replace(section, **{k: v for k, v in values.items() if v is not None})


def _backbone_options(f):
    f = click.option("--params", type=EXISTING_FILE, help="params.yaml; its sections are overridden by options.")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda[:N]")(f)
    f = click.option("--pretrained", help="open_clip pretrained tag or a local weights file [params: openai]")(f)
    f = click.option("--model", help="open_clip model name or model-config .json [params: ViT-B-16]")(f)
    return f


def _log_setup() -> None:
    """Our own notes at INFO; open_clip's and dask's chatter only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qks_pipeline").setLevel(logging.INFO)
    dask.config.set({"logging.distributed": "warning"})  # read when --cluster imports dask.distributed


def _summarise_skipped(skipped: list[dict[str, str]], limit: int = 10) -> None:
    if not skipped:
        return
    click.echo(f"{len(skipped)} unreadable image(s) masked out (valid=False):", err=True)
    for item in skipped[:limit]:
        click.echo(f"  {item['path']}: {item['reason']}", err=True)
    if len(skipped) > limit:
        click.echo(
            f"  ... and {len(skipped) - limit} more (`qks cache info` / the done markers list them all)", err=True
        )


@click.command("extract")
@click.option("--dataset", required=True, type=EXISTING_DIR, help="Dataset manifest directory.")
@click.option("--split", required=True, type=click.Choice(["train", "test"]))
@click.option("--images", required=True, type=EXISTING_DIR, help="Image root the manifest's paths are relative to.")
@click.option("--out", required=True, type=STORE, help="Zarr store to write (resumed when it exists): path or URL.")
@_backbone_options
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Autocast precision (GPU only).")
@click.option("--views", type=click.IntRange(min=0), help="Augmented views per training image besides the clean one.")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader worker processes decoding images.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--shard-size", type=click.IntRange(min=1), help="Images per Zarr shard (new stores only).")
@click.option("--strict", is_flag=True, help="An unreadable image is fatal instead of masked out.")
@click.option("--overwrite", is_flag=True, help="Rebuild the store even if it exists.")
@click.option("--replace-stale", is_flag=True, help="Rebuild a store built differently; resume one built the same.")
@click.option("--cluster", help="Run on dask: local:N (N worker processes, 1 thread each; --workers = decoding "
              "threads per worker) or tcp://HOST:PORT (a running scheduler) "
              "[params: extract.cluster; '' = here].")  # fmt: skip
def extract_cmd(dataset, split, images, out, params, device, pretrained, model, precision, views, workers, batch_size,
                shard_size, strict, overwrite, replace_stale, cluster) -> None:  # fmt: skip
    """Cache the frozen CLIP visual tokens of one split (stage one). Rerun to resume after an interruption."""
    from qks_pipeline.extract import extract

    if split == "test" and views:
        raise click.BadParameter("augmented views are for the train split only", param_hint="--views")
    _log_setup()
    p = load_params(params)
    backbone = _override(p.backbone, model=model, pretrained=pretrained)
    cfg = _override(p.extract, precision=precision, views=views, workers=workers, batch_size=batch_size,
                    shard_size=shard_size)  # fmt: skip
    result = extract(
        dataset, split, images, out, backbone, cfg, device=device, strict=strict, overwrite=overwrite,
        replace_stale=replace_stale, cluster=cluster,
    )  # fmt: skip
    if result.computed:
        click.echo(
            f"{out}: {result.computed} images in {result.shards_written} shard(s), "
            f"{result.images_per_second:.1f} images/s; store has {result.images} images"
        )
        busy = result.forward_seconds / result.loop_seconds if result.loop_seconds else 1.0
        if busy < 0.8 and result.loop_seconds > 30:  # a long run that waited on its input
            click.echo(
                f"the forward pass was busy {busy:.0%} of the time: more --workers would decode faster", err=True
            )
    else:
        click.echo(f"{out}: already complete ({result.images} images), nothing to do")
    _summarise_skipped(result.skipped)


@click.command("embed-labels")
@click.option("--dataset", required=True, type=EXISTING_DIR, help="Dataset manifest directory (seen.txt, unseen.txt).")
@click.option("--templates", required=True, type=EXISTING_FILE, help="Prompt templates, one a line with '{}'.")
@click.option("--out", required=True, type=STORE, help="Zarr store of the label embeddings: path or URL.")
@_backbone_options
@click.option("--normalize/--no-normalize", default=None, help="L2-normalise each label's mean [params: no].")
def embed_labels_cmd(dataset, templates, out, params, device, pretrained, model, normalize) -> None:
    """Encode seen then unseen labels with the prompt pool: the plain mean of the templates' text features."""
    from qks_pipeline.extract import embed_labels

    _log_setup()
    p = load_params(params)
    backbone = _override(p.backbone, model=model, pretrained=pretrained)
    labels = _override(p.labels, normalize=normalize)
    embed_labels(dataset, templates, out, backbone, labels, device=device)
    click.echo(f"{out}: label embeddings written")


@click.group("cache")
def cache_group() -> None:
    """Inspect, verify, export and import feature stores."""


@cache_group.command("info")
@click.argument("store", type=EXISTING_STORE)
def info_cmd(store: Path) -> None:
    """Shape, views, shards done, fingerprint summary, skipped images, size on disk."""
    from qks_pipeline.cache import cache_summary, open_cache

    for key, value in cache_summary(open_cache(store)).items():
        click.echo(f"{key:>13}: {value}")


@cache_group.command("verify")
@click.argument("store", type=EXISTING_STORE)
def verify_cmd(store: Path) -> None:
    """Check every shard: done marker, readable tokens, valid rows consistent with the skipped list. Exit 1 if not."""
    from qks_pipeline.cache import open_cache, verify_cache

    cache = open_cache(store)
    problems = verify_cache(cache)
    if problems:
        click.echo(f"{store}: {len(problems)} problem(s):", err=True)
        for problem in problems:
            click.echo(f"  {problem}", err=True)
        raise SystemExit(1)
    click.echo(f"{store}: OK ({cache.num_shards} shards, {cache.num_images} images, {len(cache.skipped())} skipped)")


@cache_group.command("export-hdf5")
@click.argument("store", type=EXISTING_STORE)
@click.argument("out", type=NEW_PATH)
def export_cmd(store: Path, out: Path) -> None:
    """Write a complete store to one HDF5 file (features float16, labels, valid, paths, fingerprint)."""
    from qks_pipeline.h5io import export_hdf5

    click.echo(f"{export_hdf5(store, out)}: written")


@cache_group.command("import-hdf5")
@click.argument("h5", type=EXISTING_FILE)
@click.argument("store", type=STORE)
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def import_cmd(h5: Path, store: Path, overwrite: bool) -> None:
    """Rebuild a Zarr store from an HDF5 export (done markers included)."""
    from qks_pipeline.h5io import import_hdf5

    cache = import_hdf5(h5, store, overwrite=overwrite)
    click.echo(f"{store}: {cache.num_images} images imported")


COMMANDS: list[click.Command] = [extract_cmd, embed_labels_cmd, cache_group]
