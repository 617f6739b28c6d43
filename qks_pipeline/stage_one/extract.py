"""Stage one: the frozen CLIP vision tower's tokens of a manifest's images, stored once in Zarr.

The label vocabulary is encoded with the prompt pool once too (`embed_labels`).

A shard is the unit of work: `shard_tokens` turns the batches of one shard into its tokens, written
whole, then marked done; a rerun computes only the shards not done, and equals an uninterrupted run.
Two runners call `shard_tokens`: `InProcess` (DataLoader processes decode, a thread writes the last
shard while the next is computed) and `qks_pipeline.stage_one.cluster.OnCluster` (one dask task per
shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.utils import to_2tuple
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from qks_pipeline.config import BackboneConfig, ExtractConfig, LabelsConfig
from qks_pipeline.data.images import BadImage, load_rgb
from qks_pipeline.data.manifest import (
    SPLITS,
    label_matrix,
    lines_sha256,
    read_manifest,
    read_templates,
    read_vocabulary,
    scored_labels,
)
from qks_pipeline.devices import AMP_DTYPES, autocast, resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_one.augmentation import augmented_view
from qks_pipeline.stage_one.backbone import (
    Backbone,
    encode_labels,
    file_sha256,
    load_backbone,
    token_shape,
    visual_tokens,
)
from qks_pipeline.store.features import Cache, create_cache, open_cache
from qks_pipeline.store.fingerprint import check_fingerprint, make_fingerprint
from qks_pipeline.store.label_store import write_label_embeddings
from qks_pipeline.store.location import Location

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """What one `extract` call did."""

    images: int  # rows in the store
    computed: int  # images computed by this call (0 when the store was already complete)
    shards_written: int
    loop_seconds: float  # decoding, forward passes and shard writes only
    # time inside the forward pass (incl. copies to and from the device); the rest is input wait
    forward_seconds: float
    skipped: list[dict[str, str]]  # every unreadable image of the store

    @property
    def images_per_second(self) -> float:
        return self.computed / self.loop_seconds if self.loop_seconds > 0 else 0.0


def effective_precision(precision: str, device: torch.device) -> str:
    """`precision` where it can run: fp16/bf16 autocast on a GPU only, else fp32 with a warning."""
    if precision != "fp32" and device.type != "cuda":
        log.warning("precision %s is GPU-only; extracting in fp32 on %s", precision, device)
        return "fp32"
    return precision


class ViewMaker:
    """PIL image -> (V, 3, H, W): view 0 is the model's own preprocess, views 1.. augmented ones.

    The augmented views are drawn from `augment` (`qks_pipeline.stage_one.augmentation`), each
    seeded by (seed, manifest line, view), so a rerun, a resumed run or another worker draws the
    same views.
    """

    def __init__(
        self,
        preprocess: Callable,
        preprocess_cfg: dict[str, Any],
        views: int,
        seed: int,
        augment: str,
    ):
        self.preprocess = preprocess
        self.views = views
        self.seed = seed
        self.augment = augment
        self.size = tuple(to_2tuple(preprocess_cfg["size"]))
        self.mean = list(preprocess_cfg["mean"])
        self.std = list(preprocess_cfg["std"])
        self.interpolation = preprocess_cfg["interpolation"]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1 + self.views, 3, *self.size)

    def __call__(self, img: Image.Image, key: int) -> torch.Tensor:
        out = [self.preprocess(img)]
        for v in range(1, 1 + self.views):
            rng = np.random.default_rng([self.seed, key, v])
            view = augmented_view(img, rng, self.augment, self.size, self.interpolation)
            out.append(TF.normalize(TF.to_tensor(view), self.mean, self.std))
        return torch.stack(out)  # (V, 3, H, W)


class ImageViews(Dataset):
    """Store rows -> (row, views (V, 3, H, W), reason); an unreadable image: zeros and a reason."""

    def __init__(
        self, root: Path, paths: list[str], keys: np.ndarray, make_views: ViewMaker, max_pixels: int
    ):
        self.root = root  # the images' root directory
        self.paths = paths  # each row's image, relative to `root`
        self.keys = keys  # each row's manifest line: the seed of its views
        self.make_views = make_views
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor, str]:
        try:
            image = load_rgb(self.root / self.paths[row], self.max_pixels)
            return row, self.make_views(image, int(self.keys[row])), ""
        except BadImage as e:
            return row, torch.zeros(self.make_views.shape), e.reason


def _worker_init(_: int) -> None:
    # decoding workers must not compete with the forward pass for the cores
    torch.set_num_threads(1)


def shard_batches(cache: Cache, shards: list[int], batch_size: int) -> list[list[int]]:
    """Row batches in store order that never cross a shard boundary (a shard completes before the
    next starts); `batch_size` counts views, so a batch holds batch_size // views images."""
    images = max(1, batch_size // cache.num_views)  # per batch
    return [
        list(range(begin, min(begin + images, rows.stop)))
        for rows in map(cache.shard_rows, shards)
        for begin in range(rows.start, rows.stop, images)
    ]


# the CLIP baseline's one template (docs/design.md, section 1)
CLIP_TEMPLATE = "There is a {} in the scene"


def data_fingerprint(
    manifest: Path, split: str, seen: list[str], unseen: list[str], cfg: ExtractConfig
) -> dict:
    """What besides the backbone determines a store's content.

    `cfg.precision` must be the one the forward passes run at (`effective_precision`).
    """
    return {
        "manifest_sha256": file_sha256(manifest),
        "vocabulary_sha256": lines_sha256(seen + ["|"] + unseen),
        "split": split,
        "views": cfg.views,
        # stores without views do not depend on it
        **({"augment": cfg.augment} if cfg.views else {}),
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "precision": cfg.precision,
    }


class Forward:
    """Batches of views -> float16 tokens on the CPU, under autocast when asked (GPU only)."""

    def __init__(self, clip: torch.nn.Module, device: torch.device, precision: str):
        self.clip = clip
        self.device = device
        self.dtype = AMP_DTYPES[precision]
        # time spent here: loop time minus this is what the input path failed to hide
        self.seconds = 0.0

    def __call__(self, views: torch.Tensor) -> np.ndarray:
        """Views (B, V, 3, H, W) -> tokens (B, V, T, D) float16."""
        start = time.perf_counter()
        b, v = views.shape[:2]
        x = views.flatten(0, 1).to(self.device, non_blocking=True)  # (B * V, 3, H, W)
        with autocast(self.device, self.dtype):
            tokens = visual_tokens(self.clip, x)  # (B * V, T, D)
        tokens = tokens.float().view(b, v, *tokens.shape[1:])  # (B, V, T, D)
        out = tokens.cpu().numpy().astype(np.float16)
        self.seconds += time.perf_counter() - start
        return out


# rows (B,), views (B, V, 3, H, W), reasons (B,)
ImageBatch = tuple[torch.Tensor, torch.Tensor, list[str]]


def shard_tokens(
    cache: Cache,
    shard: int,
    batches: Iterable[ImageBatch],
    dataset: ImageViews,
    forward: Forward,
    strict: bool,
    progress: Callable[[int], object] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """One shard's tokens (S, V, T, D) float16, valid (S,) and skipped images, from its batches.

    The batches cover the shard's rows; the result is what `Cache.write_shard` takes. Unreadable
    images are skipped (valid False, tokens zero), or fatal with `strict`.
    """
    rows_of_shard = cache.shard_rows(shard)
    n = rows_of_shard.stop - rows_of_shard.start
    tokens = np.zeros((n, *cache.tokens.shape[1:]), np.float16)
    valid = np.zeros(n, bool)
    skipped = []
    covered = 0
    for rows, views, reasons in batches:
        rows = rows.numpy()
        local = rows - rows_of_shard.start  # (b,) rows within the shard
        ok = np.array([not r for r in reasons])
        why = np.asarray(reasons, dtype=object)[~ok]
        for row, reason in zip(rows[~ok], why, strict=True):
            if strict:
                raise QKSError(
                    f"unreadable image: {reason} (--strict)", dataset.root / dataset.paths[row]
                )
            skipped.append({"path": dataset.paths[row], "reason": reason})
        if ok.any():
            tokens[local[ok]] = forward(views[torch.from_numpy(ok)])  # (b, V, T, D)
            valid[local[ok]] = True
        covered += len(rows)
        progress(len(rows))
    assert covered == n, f"shard {shard}: batches covered {covered} of {n} rows"
    return tokens, valid, skipped


def progress_bar(total: int) -> tqdm:
    """images/s and ETA: redrawn every second on a terminal, a line every 30 s in a log (DVC)."""
    interval = 1 if sys.stderr.isatty() else 30
    return tqdm(total=total, unit="img", desc="extract", mininterval=interval)


def make_dataset(
    cache: Cache, images_root: Path, backbone: Backbone, max_pixels: int
) -> ImageViews:
    """The store's rows as images to decode, with the views and seed its fingerprint records."""
    data = cache.fingerprint["data"]
    make_views = ViewMaker(
        backbone.preprocess,
        backbone.model.visual.preprocess_cfg,
        views=cache.num_views - 1,
        seed=int(data["seed"]),
        augment=data.get("augment", "crop_flip"),  # stores before `augment`: crop_flip
    )
    paths = list(cache.paths[:])
    return ImageViews(images_root, paths, cache.manifest_index[:], make_views, max_pixels)


def _resume(
    out: str | Path,
    location: Location,
    fingerprint: dict[str, Any],
    *,
    overwrite: bool,
    replace_stale: bool,
) -> Cache | None:
    """The store at `out` if it was built the same way (minus what interrupted writes left), else
    None: build a new one. A store built differently is refused unless `replace_stale`."""
    if not location.holds_store() or overwrite:
        return None
    cache = open_cache(out, mode="r+")
    if cache.fingerprint == fingerprint:
        if removed := location.remove_interrupted_writes():
            log.info(
                "removed %d file(s) left by interrupted writes, e.g. %s", len(removed), removed[0]
            )
        return cache
    if not replace_stale:
        hint = "--overwrite or --replace-stale rebuilds it"
        check_fingerprint(location.url, cache.fingerprint, fingerprint, "feature cache", hint=hint)
    log.info("%s was built differently; rebuilding it (--replace-stale)", location.url)
    return None


def _open_store(
    out: str | Path,
    dataset: Path,
    split: str,
    backbone: Backbone,
    cfg: ExtractConfig,
    *,
    overwrite: bool,
    replace_stale: bool,
) -> Cache:
    """Resume the store `out` (`_resume`), or build a new one: labels, paths, CLIP's projection.

    A path holding anything else is never replaced. The caller holds `Location.writer_lock`.
    """
    manifest = dataset / f"{split}.jsonl"
    location = Location.of(out)
    seen, unseen = read_vocabulary(dataset)
    records = read_manifest(manifest, seen + unseen)
    data = data_fingerprint(manifest, split, seen, unseen, cfg)
    fingerprint = make_fingerprint(backbone.fingerprint, data)
    cache = _resume(out, location, fingerprint, overwrite=overwrite, replace_stale=replace_stale)
    if cache is not None:
        return cache
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(records))
    else:
        order = np.arange(len(records))
    rest = scored_labels(split, seen, unseen)

    def labels(start: int, stop: int) -> np.ndarray:
        # one shard's rows at a time: bounded memory
        return label_matrix([records[i] for i in order[start:stop]], seen + unseen, rest=rest)

    return create_cache(
        out,
        fingerprint=fingerprint,
        token_shape=token_shape(backbone.model),
        num_views=1 + cfg.views,
        shard_size=cfg.shard_size,
        label_names=seen + unseen,
        num_seen=len(seen),
        labels=labels,
        paths=[records[i].image for i in order],
        manifest_index=order.astype(np.int64),
        visual_proj=backbone.model.visual.proj.detach().float().cpu().numpy(),
    )


def _shards_to_compute(cache: Cache) -> list[int]:
    """The shards without a done marker, and those done whose files are gone (`lost_shards`)."""
    if lost := cache.lost_shards():
        log.warning(
            "%d done shard(s) lost a file (e.g. shard %d); computing them again",
            len(lost),
            min(lost),
        )
    return sorted(set(range(cache.num_shards)) - cache.done_shards())


@dataclass
class InProcess:
    """The default runner of `extract`: the shards computed in this process.

    A runner connects (yielding the forward passes' device), says where the client loads the
    backbone (`loads_here`), and runs the shards.
    """

    device: str = "auto"
    loads_here = True  # the forward passes use the client's backbone

    @contextlib.contextmanager
    def connect(self) -> Iterator[torch.device]:
        """Yields the device the forward passes run on."""
        self.resolved = resolve_device(self.device)
        yield self.resolved

    def run(
        self,
        cache: Cache,
        shards: list[int],
        backbone: Backbone,
        images: Path,
        cfg: ExtractConfig,
        strict: bool,
    ) -> float:
        """Compute and write `shards` at the store's precision; returns the forward-pass seconds.

        A thread writes each shard while the next one is computed.
        """
        if not shards:
            return 0.0
        forward = Forward(backbone.model, self.resolved, cache.fingerprint["data"]["precision"])
        dataset = make_dataset(cache, images, backbone, cfg.max_pixels)
        loader = DataLoader(
            dataset,
            batch_sampler=shard_batches(cache, shards, cfg.batch_size),
            num_workers=cfg.workers,
            worker_init_fn=_worker_init if cfg.workers > 0 else None,
            pin_memory=forward.device.type == "cuda",
        )
        pending: Future | None = None
        with (
            ThreadPoolExecutor(max_workers=1) as writer,
            progress_bar(cache.num_rows(shards)) as bar,
        ):
            # a batch never crosses a shard boundary: its first row's shard is the batch's
            by_shard = itertools.groupby(loader, key=lambda b: int(b[0][0]) // cache.shard_size)
            for shard, batches in by_shard:
                out = shard_tokens(cache, shard, batches, dataset, forward, strict, bar.update)
                if pending is not None:
                    # at most one shard in flight: bounded memory, errors surface here
                    pending.result()
                pending = writer.submit(cache.write_shard, shard, *out)
            if pending is not None:
                pending.result()
        return forward.seconds


def extract(
    dataset_dir: str | Path,
    split: str,
    images_root: str | Path,
    out: str | Path,
    *,
    backbone: BackboneConfig,
    cfg: ExtractConfig,
    device: str = "auto",
    strict: bool = False,
    overwrite: bool = False,
    replace_stale: bool = False,
    runner: Any = None,
) -> ExtractResult:
    """Extract (or resume extracting) the visual tokens of one split of a dataset into a store.

    A store with the same fingerprint is resumed; one built differently is refused unless
    `overwrite` (always rebuild) or `replace_stale` (rebuild only when it differs: what a DVC stage
    wants). A second writer of a local store is refused.

    Args:
        dataset_dir: The dataset's manifest directory (`{split}.jsonl`, seen.txt, unseen.txt).
        split: "train" or "test"; the test split stores the clean view only.
        images_root: The directory the manifest's image paths are relative to.
        out: The store: a local directory or an fsspec URL (`qks_pipeline.store.location`).
        backbone: The `backbone` section of params.yaml: the open_clip model and its weights.
        cfg: The `extract` section of params.yaml: views, batches, shards, precision, workers.
        device: Where the forward passes run in this process (a runner resolves its own).
        strict: Fail on an unreadable image instead of masking it out (valid False).
        overwrite: Rebuild the store whatever it holds.
        replace_stale: Rebuild the store only when it was built differently.
        runner: `InProcess(device)` (the default), or `qks_pipeline.stage_one.cluster.OnCluster`
            (a dask cluster).

    Returns:
        What the call did: the store's images, those computed now, the shards written, the loop's
        and the forward passes' seconds, and every unreadable image of the store.
    """
    dataset_dir = Path(dataset_dir)
    images_root = Path(images_root)
    if split not in SPLITS:
        raise QKSError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not images_root.is_dir():
        raise QKSError("image root is not a directory", images_root)
    if split != "train" and cfg.views > 0:
        log.warning(
            "augmented views are for the train split; the %s split stores the clean view only",
            split,
        )
        cfg = dataclasses.replace(cfg, views=0)
    runner = runner or InProcess(device)
    with Location.of(out).writer_lock(), runner.connect() as dev:
        cfg = dataclasses.replace(cfg, precision=effective_precision(cfg.precision, dev))
        bb = load_backbone(backbone.model, backbone.pretrained, dev if runner.loads_here else "cpu")
        cache = _open_store(
            out, dataset_dir, split, bb, cfg, overwrite=overwrite, replace_stale=replace_stale
        )
        todo = _shards_to_compute(cache)
        start = time.perf_counter()
        forward_seconds = runner.run(
            cache, todo, backbone=bb, images=images_root, cfg=cfg, strict=strict
        )
    return ExtractResult(
        images=cache.num_images,
        computed=cache.num_rows(todo),
        shards_written=len(todo),
        loop_seconds=time.perf_counter() - start,
        forward_seconds=forward_seconds,
        skipped=cache.skipped(),
    )


def embed_labels(
    dataset_dir: str | Path,
    templates: str | Path,
    out: str | Path,
    *,
    backbone: BackboneConfig,
    labels: LabelsConfig,
    device: str = "auto",
) -> Path:
    """Encode the dataset's labels with the prompt pool and with the CLIP baseline's template.

    Both embeddings, of the seen then the unseen labels (docs/design.md, section 1), go into one
    label store, with what a checkpoint needs to embed new labels the same way.

    Args:
        dataset_dir: The dataset's manifest directory (seen.txt, unseen.txt).
        templates: The prompt pool: a text file, one template with '{}' a line.
        out: The label store: a local directory or an fsspec URL.
        backbone: The `backbone` section of params.yaml: the open_clip model and its weights.
        labels: The `labels` section of params.yaml (`normalize`).
        device: Where the text tower runs: "auto", "cpu", "cuda" or "cuda:N".

    Returns:
        `out`, as a Path.
    """
    seen, unseen = read_vocabulary(dataset_dir)
    pool = read_templates(templates)
    dev = resolve_device(device)
    bb = load_backbone(backbone.model, backbone.pretrained, dev)
    encode = partial(encode_labels, bb.model, bb.tokenizer, seen + unseen, device=dev)
    emb = encode(pool, normalize=labels.normalize)  # (C, E)
    clip = encode([CLIP_TEMPLATE], normalize=True)  # (C, E)
    write_label_embeddings(
        out,
        seen + unseen,
        emb.numpy(),
        make_fingerprint(bb.fingerprint),
        clip.numpy(),
        clip_template=CLIP_TEMPLATE,
        # a checkpoint trained on these labels records them: predict embeds new labels the same way
        templates=pool,
        templates_sha256=lines_sha256(pool),  # the pool's lines, as predict hashes its pool
        num_templates=len(pool),
        normalize=labels.normalize,
        num_seen=len(seen),
        backbone_source=bb.source,
    )
    return Path(out)
