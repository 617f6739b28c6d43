"""Stage-one commands: `qks extract`, `qks embed-labels` and the `qks cache` group.

The `qks cache` group shows, verifies, exports to HDF5 and imports from HDF5 a feature store.
Hyperparameters come from the `backbone` / `extract` / `labels` sections of `--params`, overridden
by `--set`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click
import dask

from qks_pipeline.cli.options import (
    DEVICE,
    EXISTING_DIR,
    EXISTING_FILE,
    EXISTING_STORE,
    NEW_FILE,
    STORE,
    params_options,
)
from qks_pipeline.config import BackboneConfig, Params
from qks_pipeline.data.manifest import SPLITS

if TYPE_CHECKING:
    from qks_pipeline.stage_one.extract import ExtractResult


def _backbone_options(f):
    """The options that choose the backbone: --params/--set, --device, --pretrained, --model."""
    f = params_options("backbone, extract, labels")(f)
    f = DEVICE(f)
    f = click.option(
        "--pretrained", help="open_clip pretrained tag or a local weights file [params: backbone]."
    )(f)
    return click.option(
        "--model", help="open_clip model name or model-config .json [params: backbone]."
    )(f)


def _backbone(params: Params, model: str | None, pretrained: str | None) -> BackboneConfig:
    """The `backbone` section, with --model and --pretrained where given."""
    given = {}
    if model is not None:
        given["model"] = model
    if pretrained is not None:
        given["pretrained"] = pretrained
    return dataclasses.replace(params.backbone, **given)


def _log_setup() -> None:
    """Our own notes at INFO; open_clip's and dask's chatter only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qks_pipeline").setLevel(logging.INFO)
    # read when --cluster imports dask.distributed
    dask.config.set({"logging.distributed": "warning"})


@click.command("extract")
@click.option("--dataset", required=True, type=EXISTING_DIR, help="Dataset manifest directory.")
@click.option("--split", required=True, type=click.Choice(SPLITS))
@click.option(
    "--images",
    required=True,
    type=EXISTING_DIR,
    help="Image root the manifest's paths are relative to.",
)
@click.option(
    "--out",
    required=True,
    type=STORE,
    help="Zarr store to write (resumed when it exists): path or URL.",
)
@_backbone_options
@click.option("--strict", is_flag=True, help="An unreadable image is fatal instead of masked out.")
@click.option("--overwrite", is_flag=True, help="Rebuild the store even if it exists.")
@click.option(
    "--replace-stale",
    is_flag=True,
    help="Rebuild a store built differently; resume one built the same.",
)
@click.option(
    "--cluster",
    help="Run on dask: local:N (N worker processes; extract.workers = decoding threads per "
    "worker) or tcp://HOST:PORT (a running scheduler) [params: extract.cluster; '' = here].",
)
def extract_cmd(
    dataset: Path,
    split: str,
    images: Path,
    out: str | Path,
    params: Params,
    device: str,
    pretrained: str | None,
    model: str | None,
    strict: bool,
    overwrite: bool,
    replace_stale: bool,
    cluster: str | None,
) -> None:
    """Cache the frozen CLIP visual tokens of one split (stage one).
    Rerun to resume after an interruption.

    Settings such as views, precision, batch and shard size: `--set extract.KEY=VALUE`
    (see params.yaml).
    """
    from qks_pipeline.stage_one.cluster import OnCluster
    from qks_pipeline.stage_one.extract import InProcess, extract

    sets = click.get_current_context().meta["qks.sets"]
    if split == "test" and any(s.startswith("extract.views=") for s in sets):
        raise click.BadParameter(
            "augmented views are for the train split only", param_hint="--set extract.views"
        )
    _log_setup()
    if cluster is None:
        cluster = params.extract.cluster
    runner = OnCluster(cluster, device) if cluster else InProcess(device)
    backbone = _backbone(params, model, pretrained)
    result = extract(
        dataset,
        split,
        images,
        out,
        backbone=backbone,
        cfg=params.extract,
        device=device,
        strict=strict,
        overwrite=overwrite,
        replace_stale=replace_stale,
        runner=runner,
    )
    _report_extraction(out, result)


def _report_extraction(out: str | Path, result: ExtractResult) -> None:
    """What an extraction did: its speed, an idle forward pass, the images it masked out."""
    if result.computed:
        click.echo(
            f"{out}: {result.computed} images in {result.shards_written} shard(s), "
            f"{result.images_per_second:.1f} images/s; store has {result.images} images"
        )
        busy = result.forward_seconds / result.loop_seconds if result.loop_seconds else 1.0
        # a long run that waited on its input
        if busy < 0.8 and result.loop_seconds > 30:
            click.echo(
                f"the forward pass was busy {busy:.0%} of the time: "
                "more extract.workers would help",
                err=True,
            )
    else:
        click.echo(f"{out}: already complete ({result.images} images), nothing to do")
    skipped = result.skipped
    if skipped:
        lines = [f"{len(skipped)} unreadable image(s) masked out (valid=False):"]
        lines += [f"  {item['path']}: {item['reason']}" for item in skipped[:10]]
        if len(skipped) > 10:
            lines.append(
                f"  ... and {len(skipped) - 10} more "
                "(`qks cache info` / the done markers list them all)"
            )
        click.echo("\n".join(lines), err=True)


@click.command("embed-labels")
@click.option(
    "--dataset",
    required=True,
    type=EXISTING_DIR,
    help="Dataset manifest directory (seen.txt, unseen.txt).",
)
@click.option(
    "--templates", required=True, type=EXISTING_FILE, help="Prompt templates, one a line with '{}'."
)
@click.option(
    "--out", required=True, type=STORE, help="Zarr store of the label embeddings: path or URL."
)
@_backbone_options
def embed_labels_cmd(
    dataset: Path,
    templates: Path,
    out: str | Path,
    params: Params,
    device: str,
    pretrained: str | None,
    model: str | None,
) -> None:
    """Encode seen then unseen labels with the prompt pool: the plain mean of the templates'
    text features (`--set labels.normalize=true` L2-normalises each mean)."""
    from qks_pipeline.stage_one.extract import embed_labels

    _log_setup()
    backbone = _backbone(params, model, pretrained)
    embed_labels(dataset, templates, out, backbone=backbone, labels=params.labels, device=device)
    click.echo(f"{out}: label embeddings written")


@click.group("cache")
def cache_group() -> None:
    """Inspect, verify, export and import feature stores."""


@cache_group.command("info")
@click.argument("store", type=EXISTING_STORE)
def info_cmd(store: Path) -> None:
    """Shape, views, shards done, fingerprint summary, skipped images, size on disk."""
    from qks_pipeline.store.features import cache_summary, open_cache

    for key, value in cache_summary(open_cache(store)).items():
        click.echo(f"{key:>13}: {value}")


@cache_group.command("verify")
@click.argument("store", type=EXISTING_STORE)
def verify_cmd(store: Path) -> None:
    """Check a feature store (every shard's done marker, every chunk of every array there and its
    crc32c, valid rows consistent with the skipped list), a label store or a query index.
    Exit 1 if not."""
    from qks_pipeline.index.store import is_index
    from qks_pipeline.index.verify import verify_index
    from qks_pipeline.store.location import Location
    from qks_pipeline.store.verify import verify_store

    if is_index(Location.of(store)):
        verdict = verify_index(store)
    else:
        verdict = verify_store(store)
    if verdict.problems:
        head = f"{store}: damaged {verdict.kind}, {len(verdict.problems)} problem(s):"
        click.echo("\n".join([head] + [f"  {p}" for p in verdict.problems]), err=True)
        raise SystemExit(1)
    click.echo(f"{store}: OK ({verdict.kind}: {verdict.summary})")


@cache_group.command("export-hdf5")
@click.argument("store", type=EXISTING_STORE)
@click.argument("out", type=NEW_FILE)
def export_cmd(store: Path, out: Path) -> None:
    """Write a complete store to one HDF5 file
    (features float16, labels, valid, paths, fingerprint)."""
    from qks_pipeline.store.hdf5 import export_hdf5_cache

    click.echo(f"{export_hdf5_cache(store, out)}: written")


@cache_group.command("import-hdf5")
@click.argument("h5", type=EXISTING_FILE)
@click.argument("store", type=STORE)
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def import_cmd(h5: Path, store: Path, overwrite: bool) -> None:
    """Rebuild a Zarr store from an HDF5 export (done markers included)."""
    from qks_pipeline.store.hdf5 import import_hdf5_cache

    cache = import_hdf5_cache(h5, store, overwrite=overwrite)
    click.echo(f"{store}: {cache.num_images} images imported")


COMMANDS: list[click.Command] = [extract_cmd, embed_labels_cmd, cache_group]
