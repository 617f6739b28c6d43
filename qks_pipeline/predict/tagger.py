"""Open-vocabulary tagging of new images: CLIP tokens -> a trained Q-Former -> any label list.

The backbone is the one the checkpoint records, checked by its fingerprint. Images get its own
preprocessing (the clean view of stage one) and labels stage one's `encode_labels`, so scores equal
`qks evaluate`'s up to the cache's float16 rounding. Label embeddings are cached on disk, one file
per (backbone, label, templates, normalisation). Usage: README.md, "Tagging new images".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from qks_pipeline.atomic import atomic_path
from qks_pipeline.config import ExtractConfig
from qks_pipeline.data.images import BadImage, load_rgb, to_rgb
from qks_pipeline.data.manifest import clip_text_key, lines_sha256, read_templates
from qks_pipeline.devices import autocast, resolve_device
from qks_pipeline.errors import QKSError, shorten
from qks_pipeline.stage_one.backbone import Backbone, encode_labels, load_backbone, visual_tokens
from qks_pipeline.stage_two import checkpoint
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.store.label_store import check_label_embedding

log = logging.getLogger(__name__)

# the prompt pool; dvc.yaml's embed_labels stage reads it too
TEMPLATES = Path(__file__).parents[1] / "templates.txt"
ImageInput = str | Path | Image.Image


def prompt_pool() -> list[str]:
    """The prompt template pool (docs/design.md, section 1)."""
    return read_templates(TEMPLATES)


def clean_labels(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """(unique labels in first-seen order, the repeats dropped); none left is an error.

    Labels are stripped, inner whitespace collapsed, blanks dropped. A label equal to an earlier one
    up to case is a repeat too, merged into the first spelling: CLIP's tokenizer lowercases, so both
    would get one embedding (`manifest.clip_text_key`).
    """
    # CLIP's reading of a label -> the first spelling given
    unique: dict[str, str] = {}
    dropped = []
    for raw in labels:
        label = " ".join(str(raw).split())
        key = clip_text_key(label)
        if key in unique:
            dropped.append(label)
        elif label:
            unique[key] = label
    if not unique:
        raise QKSError("the label list is empty (give at least one non-blank label)")
    return list(unique.values()), dropped


def repeats_note(dropped: Sequence[str]) -> str:
    """One line naming the labels `clean_labels` dropped."""
    repeated = shorten(", ".join(dict.fromkeys(dropped)))
    return f"repeated label(s) removed (equal to one before, up to case): {repeated}"


def default_cache_dir() -> Path:
    """$QKS_CACHE_DIR, else $XDG_CACHE_HOME/qks, else ~/.cache/qks; then /label_embeddings."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = os.environ.get("QKS_CACHE_DIR") or Path(cache) / "qks"
    return Path(root) / "label_embeddings"


def label_key(
    fingerprint: dict[str, Any], label: str, templates: Sequence[str], normalize: bool
) -> str:
    """One label embedding's cache key: sha256 of (backbone, label, templates, normalize)."""
    identity = {"backbone": fingerprint, "label": label, "templates": lines_sha256(templates)}
    # keys made before `normalize` existed stay valid
    if normalize:
        identity["normalize"] = True
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cached(path: Path, dim: int) -> np.ndarray | None:
    """A cached (E,) float32 embedding; an unreadable or misshapen file counts as missing."""
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if emb.shape != (dim,) or emb.dtype != np.float32 or not np.isfinite(emb).all():
        return None
    return emb


@dataclass
class Prediction:
    """One image's result. For a skipped image only `image` and `skipped` are set."""

    image: str  # the path as given (or "<image i>" for an in-memory image without a file name)
    labels: list[str]  # the label list scored, shared by all predictions of a call
    scores: np.ndarray | None  # (C,) sigmoid scores in label order
    logits: np.ndarray | None  # (C,) the head's logits (float32)
    top: list[tuple[str, float]]  # the top-K (label, score), best first
    above: list[tuple[str, float]]  # every (label, score) with score > threshold, best first
    skipped: str | None = None  # why the image could not be read

    @property
    def scores_by_label(self) -> dict[str, float]:
        if self.scores is None:
            return {}
        return {k: float(v) for k, v in zip(self.labels, self.scores, strict=True)}

    def to_json(self, all_scores: bool = False) -> dict[str, Any]:
        """The JSONL record: image, top, above_threshold ([{label, score}]), or image, skipped."""
        if self.skipped is not None:
            return {"image": self.image, "skipped": self.skipped}
        top = _scored(self.top)
        above = _scored(self.above)
        out = {"image": self.image, "top": top, "above_threshold": above}
        if all_scores:
            out["scores"] = {k: round(v, 6) for k, v in self.scores_by_label.items()}
        return out


def _scored(pairs: list[tuple[str, float]]) -> list[dict[str, Any]]:
    return [{"label": label, "score": round(score, 6)} for label, score in pairs]


def rank(
    labels: list[str], logits: np.ndarray, top_k: int, threshold: float
) -> tuple[list, list, np.ndarray]:
    """(top-K pairs, above-threshold pairs, sigmoid scores (C,)) of one image's logits (C,)."""
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))  # (C,)
    order = np.argsort(-scores, kind="stable")  # ties keep label order
    top = [(labels[j], float(scores[j])) for j in order[:top_k]]
    above = [(labels[j], float(scores[j])) for j in order if scores[j] > threshold]
    return top, above, scores.astype(np.float32)


class _Images(Dataset):
    """index -> (index, preprocessed image (3, H, W), reason); unreadable: zeros and a reason."""

    def __init__(
        self,
        items: Sequence[ImageInput],
        preprocess: Callable,
        shape: tuple[int, ...],
        max_pixels: int,
    ):
        self.items = items
        self.preprocess = preprocess
        self.shape = shape
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        item = self.items[i]
        try:
            if isinstance(item, Image.Image):
                img = to_rgb(item)
            else:
                img = load_rgb(item, self.max_pixels, limit_option="--max-pixels N")
            return i, self.preprocess(img), ""
        except BadImage as e:
            return i, torch.zeros(self.shape), e.reason


def _template_pool(
    directory: Path, config: dict[str, Any], templates: Sequence[str] | str | Path | None
) -> list[str]:
    """The prompt pool to embed labels with: `templates`, else the checkpoint's, else ours.

    A pool other than the one the checkpoint's labels were embedded with is refused.
    """
    if isinstance(templates, (str, Path)):
        templates = read_templates(templates)
    trained = config.get("label_embedding") or {}
    if templates is not None:
        pool = list(templates)
    else:
        pool = trained.get("templates") or prompt_pool()
    # check the pool only
    found = trained | {"num_templates": len(pool), "templates_sha256": lines_sha256(pool)}
    try:
        check_label_embedding(directory, found, trained)
    except QKSError as e:
        raise QKSError(f"{e.message} (--templates FILE: the pool it was trained with)") from None
    return pool


def _image_name(item: ImageInput, i: int) -> str:
    """A prediction's image: the path as given, else the PIL image's file name or "<image i>"."""
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"<image {i}>"
    return str(item)


@dataclass
class Tagger:
    """CLIP + a trained QKS head, ready to tag images with any label list; see `Tagger.load`."""

    backbone: Backbone  # the checkpoint's, checked by its fingerprint
    head: QKS
    config: dict[str, Any]  # the checkpoint's config.json
    templates: list[str]
    device: torch.device
    # float16 autocast (CUDA only) for the backbone; the head and the ranking stay float32
    amp: bool = False
    cache_dir: Path | None = None  # of label embeddings (None: no disk cache)
    max_pixels: int = ExtractConfig.max_pixels  # Pillow's decompression-bomb limit

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        device: str = "auto",
        pretrained: str | None = None,
        *,
        model: str | None = None,
        templates: Sequence[str] | str | Path | None = None,
        cache_dir: str | Path | None | bool = True,
        amp: bool = False,
        max_pixels: int = ExtractConfig.max_pixels,
    ) -> Tagger:
        """Load the checkpoint's head and the backbone it records; check they belong together.

        Args:
            checkpoint_dir: a `qks train` (or `qks import-checkpoint`) output directory.
            device: auto (CUDA when present) | cpu | cuda[:N].
            pretrained: the backbone's weights (file or open_clip tag), when not where the
                checkpoint says.
            model: the backbone's model (name or config .json), when not where the checkpoint
                says.
            templates: the prompt templates (a list, or a file one a line); default: those the
                checkpoint's labels were embedded with (else `prompt_pool()`). Another pool is
                refused.
            cache_dir: of label embeddings; True: `default_cache_dir()`; None or False: no disk
                cache.
            amp: float16 autocast for the backbone on CUDA (ignored on the CPU).
            max_pixels: larger images are skipped as decompression bombs.
        """
        directory = Path(checkpoint_dir)
        dev = resolve_device(device)
        # before CLIP: a broken checkpoint fails fast
        head, config = checkpoint.load(directory, dev)
        backbone_args = checkpoint.backbone_args(directory, config, model, pretrained)
        backbone = load_backbone(*backbone_args, dev)
        checkpoint.check_backbone(directory, config["fingerprint"], backbone.fingerprint)
        pool = _template_pool(directory, config, templates)
        if cache_dir is True:
            cache_dir = default_cache_dir()
        elif cache_dir:
            cache_dir = Path(cache_dir)
        else:
            cache_dir = None
        return cls(
            backbone=backbone,
            head=head,
            config=config,
            templates=pool,
            device=dev,
            amp=amp,
            cache_dir=cache_dir,
            max_pixels=max_pixels,
        )

    @property
    def normalize_labels(self) -> bool:
        """Whether the head was trained on L2-normalised label means (`labels.normalize`)."""
        return bool((self.config.get("label_embedding") or {}).get("normalize", False))

    def label_embeddings(self, labels: Sequence[str], progress: bool | None = None) -> torch.Tensor:
        """(C, E) float32 on the device, as stage one's `encode_labels` makes them.

        From the disk cache when there, else encoded (with a progress bar: `progress`, None on a
        terminal only) and cached (atomically, for concurrent taggers; an unwritable cache is
        reported and skipped).
        """
        files = self._cache_files(labels)
        dim = int(self.head.proj.shape[1])
        # label index -> (E,)
        found = {}
        for i, file in enumerate(files):
            emb = _read_cached(file, dim)
            if emb is not None:
                found[i] = emb
        missing = [i for i in range(len(labels)) if i not in found]
        if missing:
            model = self.backbone.model
            tokenizer = self.backbone.tokenizer
            texts = [labels[i] for i in missing]
            normalize = self.normalize_labels
            # (M, E)
            emb = encode_labels(
                model,
                tokenizer,
                texts,
                self.templates,
                normalize,
                device=self.device,
                progress=progress,
            )
            found |= dict(zip(missing, emb.numpy(), strict=True))
            if files:
                self._write_cache([files[i] for i in missing], [found[i] for i in missing])
        # (C, E)
        stacked = np.stack([found[i] for i in range(len(labels))])
        return torch.from_numpy(stacked).to(self.device)

    def _cache_files(self, labels: Sequence[str]) -> list[Path]:
        """Each label's file in the disk cache; none without a cache."""
        if not self.cache_dir:
            return []
        fingerprint = self.backbone.fingerprint
        normalize = self.normalize_labels
        keys = [label_key(fingerprint, label, self.templates, normalize) for label in labels]
        return [self.cache_dir / f"{key}.npy" for key in keys]

    def _write_cache(self, files: list[Path], embeddings: list[np.ndarray]) -> None:
        """Save embeddings to the disk cache, each atomically; an unwritable cache is a warning."""
        try:
            for file, emb in zip(files, embeddings, strict=True):
                with atomic_path(file) as tmp, open(tmp, "wb") as f:
                    np.save(f, emb)
        except OSError as e:
            log.warning(
                "label-embedding cache %s not writable (%s); continuing without it",
                self.cache_dir,
                e,
            )

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), preprocessed, and label embeddings (C, E) -> CPU logits (B, C)."""
        pixels = pixels.to(self.device, non_blocking=True)
        with autocast(self.device, torch.float16 if self.amp else None):
            # (B, T, D)
            tokens = visual_tokens(self.backbone.model, pixels)
        # (B, C) float32
        return self.head(tokens.float(), label_emb.float()).float().cpu()

    def iter_predict(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        top_k: int = 5,
        threshold: float = 0.5,
        *,
        batch_size: int = 32,
        workers: int = 0,
        progress: bool = False,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> Iterator[Prediction]:
        """Like `predict`, yielding each batch's predictions as soon as they are computed."""
        if top_k < 1:
            raise QKSError(f"top_k must be at least 1, got {top_k}")
        names, dropped = clean_labels(labels)
        if dropped:
            log.warning("%s", repeats_note(dropped))
        # (C, E)
        label_emb = self.label_embeddings(names, progress)
        size = self.backbone.fingerprint["preprocess"]["size"]
        data = _Images(images, self.backbone.preprocess, (3, *size), self.max_pixels)
        pin_memory = self.device.type == "cuda"
        loader = DataLoader(data, batch_size, num_workers=workers, pin_memory=pin_memory)
        with tqdm(total=len(images), unit="img", desc="predict", disable=not progress) as bar:
            # (B,), (B, 3, H, W), B reasons
            for index, pixels, reasons in loader:
                ok = [j for j, r in enumerate(reasons) if not r]
                if ok:
                    logits = self.logits(pixels[ok], label_emb).numpy()
                else:
                    logits = np.zeros((0, len(names)))
                row = dict(zip(ok, logits, strict=True))
                for j, i in enumerate(index.tolist()):
                    name = _image_name(images[i], i)
                    if reasons[j]:
                        if on_skip is not None:
                            on_skip(name, reasons[j])
                        yield Prediction(name, names, None, None, [], [], skipped=reasons[j])
                    else:
                        top, above, scores = rank(names, row[j], top_k, threshold)
                        yield Prediction(name, names, scores, row[j], top, above)
                bar.update(len(index))

    def predict(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        top_k: int = 5,
        threshold: float = 0.5,
        *,
        batch_size: int = 32,
        workers: int = 0,
        progress: bool = False,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> list[Prediction]:
        """One prediction per image, in input order; an unreadable file comes back `skipped`.

        Args:
            images: paths or PIL images.
            labels: any label list (stripped, repeats dropped).
            top_k: how many of the best labels each prediction lists, best first.
            threshold: each prediction also lists every label scored above it.
            batch_size: images a forward pass.
            workers: image-decoding processes.
            progress: show a tqdm bar.
            on_skip: called with (name, reason) for each unreadable image.
        """
        predictions = self.iter_predict(
            images,
            labels,
            top_k,
            threshold,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            on_skip=on_skip,
        )
        return list(predictions)
