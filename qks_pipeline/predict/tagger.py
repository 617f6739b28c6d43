"""Open-vocabulary tagging of new images with a trained QKS head: CLIP tokens -> Q-Former -> any
label list.

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
from qks_pipeline.data.manifest import lines_sha256, read_templates
from qks_pipeline.devices import autocast, resolve_device
from qks_pipeline.errors import QKSError
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
    """(unique labels in first-seen order, the repeats dropped): labels stripped, inner whitespace
    collapsed (CLIP's tokenizer does too), blanks dropped; none left is an error."""
    unique, dropped = {}, []
    for label in (" ".join(str(raw).split()) for raw in labels):
        if label in unique:
            dropped.append(label)
        elif label:
            unique[label] = None
    if not unique:
        raise QKSError("the label list is empty (give at least one non-blank label)")
    return list(unique), dropped


def default_cache_dir() -> Path:
    """$QKS_CACHE_DIR/label_embeddings, else $XDG_CACHE_HOME/qks/..., else
    ~/.cache/qks/label_embeddings."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("QKS_CACHE_DIR") or Path(cache) / "qks") / "label_embeddings"


def label_key(
    fingerprint: dict[str, Any], label: str, templates: Sequence[str], normalize: bool
) -> str:
    """The cache key of one label's embedding: sha256 of (backbone fingerprint, label, templates,
    normalize)."""
    blob = {"backbone": fingerprint, "label": label, "templates": lines_sha256(templates)}
    blob = json.dumps(blob | ({"normalize": True} if normalize else {}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cached(path: Path, dim: int) -> np.ndarray | None:
    """A cached (E,) float32 embedding; an unreadable or misshapen file counts as missing."""
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return (
        emb if emb.shape == (dim,) and emb.dtype == np.float32 and np.isfinite(emb).all() else None
    )


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
        return (
            {}
            if self.scores is None
            else {k: float(v) for k, v in zip(self.labels, self.scores, strict=True)}
        )

    def to_json(self, all_scores: bool = False) -> dict[str, Any]:
        """The JSONL record: image, top, above_threshold (lists of {label, score}), or image and
        skipped."""
        if self.skipped is not None:
            return {"image": self.image, "skipped": self.skipped}
        top, above = (
            [{"label": label, "score": round(score, 6)} for label, score in pairs]
            for pairs in (self.top, self.above)
        )
        out = {"image": self.image, "top": top, "above_threshold": above}
        if all_scores:
            out["scores"] = {k: round(v, 6) for k, v in self.scores_by_label.items()}
        return out


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
    """index -> (index, preprocessed image (3, H, W), reason); an unreadable image gives zeros and a
    reason."""

    def __init__(
        self,
        items: Sequence[ImageInput],
        preprocess: Callable,
        shape: tuple[int, ...],
        max_pixels: int,
    ):
        self.items, self.preprocess, self.shape, self.max_pixels = (
            items,
            preprocess,
            shape,
            max_pixels,
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        item = self.items[i]
        try:
            img = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(item, self.max_pixels)
            return i, self.preprocess(img), ""
        except BadImage as e:
            return i, torch.zeros(self.shape), e.reason


@dataclass
class Tagger:
    """CLIP + a trained QKS head, ready to tag images with any label list. Build it with
    `Tagger.load`."""

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
        """Load the checkpoint's head and the backbone it records, and check that they belong
        together.

        Args:
            checkpoint_dir: a `qks train` (or `qks import-checkpoint`) output directory.
            device: auto (CUDA when present) | cpu | cuda[:N].
            pretrained, model: the backbone's weights (file or open_clip tag) and model (name or config .json), when
                not where the checkpoint says.
            templates: the prompt templates (a list, or a file one a line); default: those the checkpoint's labels were
                embedded with (else `prompt_pool()`). Another pool is refused.
            cache_dir: of label embeddings; True: `default_cache_dir()`; None or False: no disk cache.
            amp: float16 autocast for the backbone on CUDA (ignored on the CPU).
            max_pixels: larger images are skipped as decompression bombs.
        """
        directory, dev = Path(checkpoint_dir), resolve_device(device)
        # before CLIP: a broken checkpoint fails fast
        head, config = checkpoint.load(directory, dev)
        backbone = load_backbone(
            *checkpoint.backbone_args(directory, config, model, pretrained), dev
        )
        checkpoint.check_backbone(directory, config["fingerprint"], backbone.fingerprint)
        if isinstance(templates, (str, Path)):
            templates = read_templates(templates)
        trained = config.get("label_embedding") or {}
        pool = (
            list(templates) if templates is not None else trained.get("templates") or prompt_pool()
        )
        # check the pool only
        found = trained | {"num_templates": len(pool), "templates_sha256": lines_sha256(pool)}
        try:
            check_label_embedding(directory, found, trained)
        except QKSError as e:
            raise QKSError(
                f"{e.message} (--templates FILE: the pool it was trained with)"
            ) from None
        cache_dir = (
            default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
        )
        return cls(backbone, head, config, pool, dev, amp, cache_dir, max_pixels)

    @property
    def normalize_labels(self) -> bool:
        """Whether the head was trained on L2-normalised label means (`labels.normalize`)."""
        return bool((self.config.get("label_embedding") or {}).get("normalize", False))

    def label_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        """(C, E) float32 on the device, as stage one's `encode_labels` makes them: from the disk
        cache when there, else encoded and cached (atomically, for concurrent taggers; an unwritable
        cache is reported and skipped)."""
        dim, normalize, bb = int(self.head.proj.shape[1]), self.normalize_labels, self.backbone
        keys = [label_key(bb.fingerprint, label, self.templates, normalize) for label in labels]
        files = [self.cache_dir / f"{key}.npy" for key in keys] if self.cache_dir else []
        found = {i: e for i, f in enumerate(files) if (e := _read_cached(f, dim)) is not None}
        if missing := [i for i in range(len(labels)) if i not in found]:
            texts = [labels[i] for i in missing]
            # (M, E)
            emb = encode_labels(
                bb.model, bb.tokenizer, texts, self.templates, normalize, device=self.device
            )
            found |= dict(zip(missing, emb.numpy(), strict=True))
            try:
                for i in missing if files else []:
                    with atomic_path(files[i]) as tmp, open(tmp, "wb") as f:
                        np.save(f, found[i])
            except OSError as e:
                log.warning(
                    "label-embedding cache %s not writable (%s); continuing without it",
                    self.cache_dir,
                    e,
                )
        # (C, E)
        return torch.from_numpy(np.stack([found[i] for i in range(len(labels))])).to(self.device)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) and label embeddings (C, E) -> logits (B, C) float32 on
        the CPU."""
        with autocast(self.device, torch.float16 if self.amp else None):
            # (B, T, D)
            tokens = visual_tokens(self.backbone.model, pixels.to(self.device, non_blocking=True))
        return self.head(tokens.float(), label_emb.float()).float().cpu()  # (B, C)

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
        """Like `predict`, yielding each batch's predictions as soon as they are computed (for long
        runs)."""
        if top_k < 1:
            raise QKSError(f"top_k must be at least 1, got {top_k}")
        names, dropped = clean_labels(labels)
        if dropped:
            log.warning("duplicate label(s) removed: %s", ", ".join(dict.fromkeys(dropped)))
        label_emb = self.label_embeddings(names)  # (C, E)
        size = self.backbone.fingerprint["preprocess"]["size"]
        data = _Images(images, self.backbone.preprocess, (3, *size), self.max_pixels)
        loader = DataLoader(
            data, batch_size, num_workers=workers, pin_memory=self.device.type == "cuda"
        )
        with tqdm(total=len(images), unit="img", desc="predict", disable=not progress) as bar:
            for index, pixels, reasons in loader:  # (B,), (B, 3, H, W), B reasons
                ok = [j for j, r in enumerate(reasons) if not r]
                logits = (
                    self.logits(pixels[ok], label_emb).numpy() if ok else np.zeros((0, len(names)))
                )
                row = dict(zip(ok, logits, strict=True))
                for j, i in enumerate(index.tolist()):
                    item = images[i]
                    in_memory = isinstance(item, Image.Image)
                    name = (
                        (getattr(item, "filename", "") or f"<image {i}>")
                        if in_memory
                        else str(item)
                    )
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
        **kwargs: Any,
    ) -> list[Prediction]:
        """One prediction per image (paths or PIL images), in input order: the `top_k` labels, best
        first, and every label scored above `threshold`; unreadable files come back with `skipped`
        set. `kwargs`: batch_size, workers (decoding processes), progress (a tqdm bar),
        on_skip(name, reason)."""
        return list(self.iter_predict(images, labels, top_k, threshold, **kwargs))
