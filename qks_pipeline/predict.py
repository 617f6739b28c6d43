"""Open-vocabulary tagging of new images with a trained QKS head: CLIP tokens -> Q-Former -> any label list.

Unlike stage two, this loads CLIP: the backbone named by the checkpoint's fingerprint (config.json), checked to be the
very one the head was trained on. Images get the backbone's own preprocessing (center crop, the clean view of stage
one); labels are embedded with the prompt pool exactly like stage one's `encode_labels` (the mean of unnormalised
text features, L2-normalised when the checkpoint's label store was), so scores equal `qks evaluate`'s on the same
images up to the cache's float16 rounding. Label embeddings are cached on disk, one small file per (backbone, label,
templates, normalisation) key.

    tagger = Tagger.load("runs/qks", device="auto")
    for p in tagger.predict(["a.jpg", "b.png"], ["dog", "beach", "sunset"], top_k=2):
        print(p.image, p.top)
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
from qks_pipeline.backbone import backbone_fingerprint, encode_labels, load_backbone, visual_tokens
from qks_pipeline.cache import differing_keys
from qks_pipeline.devices import autocast, resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.evaluate import load_checkpoint
from qks_pipeline.images import BadImage, load_rgb, to_rgb
from qks_pipeline.manifest import read_templates
from qks_pipeline.model import QKS

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SCENE_TEMPLATES = (  # the reference's 5 scene templates, after open_clip's 80 ImageNet templates
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
ImageInput = str | Path | Image.Image


def prompt_pool() -> list[str]:
    """The 85-template pool (DESIGN.md section 1): open_clip's OPENAI_IMAGENET_TEMPLATES, then the scene templates.

    Equal to `data_manifests/templates.txt` (checked by the tests), but available without the repository.
    """
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + list(SCENE_TEMPLATES)


# ---------------------------------------------------------------- inputs: labels and image files


def clean_labels(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """Strip labels and collapse inner whitespace (CLIP's tokenizer does too), drop blanks and repeats.

    Returns:
        (unique labels in first-seen order, the repeats that were dropped).

    Raises:
        QKSError: no label is left.
    """
    unique, dropped, seen = [], [], set()
    for raw in labels:
        label = " ".join(str(raw).split())
        if not label:
            continue
        if label in seen:
            dropped.append(label)
            continue
        seen.add(label)
        unique.append(label)
    if not unique:
        raise QKSError("the label list is empty (give at least one non-blank label)")
    return unique, dropped


def parse_labels(text: str) -> list[str]:
    """A comma-separated label list ("dog, beach ball, sunset") as raw entries; `clean_labels` tidies them."""
    return text.split(",")


def read_label_file(path: str | Path) -> list[str]:
    """One label a line (UTF-8) as raw entries; `clean_labels` tidies them."""
    path = Path(path)
    if not path.is_file():
        raise QKSError("label file not found", path)
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise QKSError(f"label file is not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by `inputs`: a file is taken as given, a directory is walked for image extensions.

    A directory's files come sorted by their path under it; hidden files and directories (a leading '.') are left
    out. A path that does not exist is kept, so that it is reported as skipped (missing) with the others.

    Raises:
        QKSError: nothing to tag.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)
            continue
        files = [
            p
            for p in item.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(item).parts)
        ]
        if not files:
            raise QKSError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under this directory", item)
        found += sorted(files, key=lambda p: p.relative_to(item).as_posix())
    if not found:
        raise QKSError("no images given")
    return found


# ---------------------------------------------------------------- the backbone named by a checkpoint


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a `qks train` / `qks import-checkpoint` directory, with its backbone fingerprint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QKSError("checkpoint directory not found", directory)
    path = directory / "config.json"
    if not path.is_file():
        raise QKSError("not found; is this a `qks train` output directory?", path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QKSError(f"not valid JSON ({e})", path) from None
    if not isinstance(config, dict) or not isinstance(config.get("fingerprint"), dict):
        raise QKSError("has no backbone 'fingerprint'; not a `qks train` config", path)
    return config


def describe_backbone(fp: dict[str, Any]) -> str:
    """A short human name of a backbone fingerprint: model, config hash, weights source and hash."""
    model = fp.get("model")
    if fp.get("model_config_sha256"):
        model = f"{model} (config sha256 {fp['model_config_sha256'][:12]})"
    weights = fp.get("pretrained") or "random"
    return f"{model}, weights {weights} sha256 {str(fp.get('weights_sha256'))[:12]}"


def check_backbone(checkpoint: Path, expected: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Refuse a backbone other than the one the checkpoint was trained on, naming both."""
    diffs = [key for key, _, _ in differing_keys(expected, loaded)]
    if diffs:
        raise QKSError(
            f"backbone mismatch: the checkpoint was trained on {describe_backbone(expected)}, but the loaded backbone "
            f"is {describe_backbone(loaded)} (differs in {', '.join(diffs)})",
            checkpoint / "config.json",
        )


def backbone_source(checkpoint: Path, fp: dict[str, Any], model: str | None, pretrained: str | None) -> tuple[str, str]:
    """The (model, pretrained) arguments of `load_backbone` that should rebuild the checkpoint's backbone.

    The fingerprint records a model name and a weights tag or hash, not file paths: a model-config file needs
    `model`, and a weights file `pretrained` (or `clip_weights.pt` in the checkpoint, as `qks import-checkpoint`
    writes it).
    """
    if model is None:
        if fp.get("model_config_sha256"):
            raise QKSError(
                f"the checkpoint's backbone is the model-config file {fp['model']}.json "
                f"(sha256 {fp['model_config_sha256'][:12]}); give its path with --model",
                checkpoint / "config.json",
            )
        model = str(fp["model"])
    if pretrained is None:
        exported = checkpoint / "clip_weights.pt"
        if fp.get("pretrained") not in (None, "file"):
            pretrained = str(fp["pretrained"])  # an open_clip tag: open_clip finds or downloads the file
        elif fp.get("pretrained") is None:
            pretrained = "none"  # seeded random weights (tests, benchmarks)
        elif exported.is_file():
            pretrained = str(exported)
        else:
            raise QKSError(
                f"the checkpoint's backbone weights are a local file (sha256 {str(fp.get('weights_sha256'))[:12]}); "
                "give its path with --pretrained",
                checkpoint / "config.json",
            )
    return model, pretrained


# ---------------------------------------------------------------- label embeddings, cached on disk


def default_cache_dir() -> Path:
    """$QKS_CACHE_DIR/label_embeddings, else $XDG_CACHE_HOME/qks/..., else ~/.cache/qks/label_embeddings."""
    if os.environ.get("QKS_CACHE_DIR"):
        return Path(os.environ["QKS_CACHE_DIR"]) / "label_embeddings"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qks" / "label_embeddings"


def templates_sha256(templates: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()


def label_key(fingerprint: dict[str, Any], label: str, templates_hash: str, normalize: bool = False) -> str:
    """The cache key of one label's embedding: sha256 of (backbone fingerprint, label, templates hash, normalize)."""
    blob = {"backbone": fingerprint, "label": label, "templates": templates_hash}
    blob = json.dumps(blob | ({"normalize": True} if normalize else {}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class LabelEmbeddingCache:
    """One .npy file (E,) float32 per key under `directory`; unreadable or misshapen files count as missing.

    Writes go through a temporary name and a rename, so concurrent taggers never read half a file. A directory that
    cannot be written is reported once and then ignored.
    """

    def __init__(self, directory: Path | None):
        self.directory = directory  # None: no disk cache
        self._warned = False

    def get(self, key: str, dim: int) -> np.ndarray | None:
        if self.directory is None:
            return None
        try:
            emb = np.load(self.directory / f"{key}.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        return emb if emb.shape == (dim,) and emb.dtype == np.float32 and np.isfinite(emb).all() else None

    def put(self, key: str, emb: np.ndarray) -> None:
        if self.directory is None:
            return
        try:
            with atomic_path(self.directory / f"{key}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, emb.astype(np.float32))
        except OSError as e:
            if not self._warned:
                log.warning("label-embedding cache %s not writable (%s); continuing without it", self.directory, e)
                self._warned = True


# ---------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """One image's result. For a skipped image only `image` and `skipped` are set."""

    image: str  # the path as given (or "<image i>" for an in-memory image without a file name)
    labels: list[str]  # the label list scored, shared by all predictions of a call
    scores: np.ndarray | None  # (C,) sigmoid scores in label order
    logits: np.ndarray | None  # (C,) the head's logits
    top: list[tuple[str, float]]  # the top-K (label, score), best first
    above: list[tuple[str, float]]  # every (label, score) with score > threshold, best first
    skipped: str | None = None  # why the image could not be read

    @property
    def scores_by_label(self) -> dict[str, float]:
        return {} if self.scores is None else {k: float(v) for k, v in zip(self.labels, self.scores, strict=True)}

    def to_json(self, all_scores: bool = False) -> dict[str, Any]:
        """The JSONL record: image, top, above_threshold (lists of {label, score}), or image and skipped."""
        if self.skipped is not None:
            return {"image": self.image, "skipped": self.skipped}

        def pairs(items: list[tuple[str, float]]) -> list[dict[str, Any]]:
            return [{"label": label, "score": round(score, 6)} for label, score in items]

        out = {"image": self.image, "top": pairs(self.top), "above_threshold": pairs(self.above)}
        if all_scores:
            out["scores"] = {k: round(v, 6) for k, v in self.scores_by_label.items()}
        return out


def rank(labels: list[str], logits: np.ndarray, top_k: int, threshold: float) -> tuple[list, list, np.ndarray]:
    """(top-K pairs, above-threshold pairs, sigmoid scores (C,)) of one image's logits (C,)."""
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))  # (C,)
    order = np.argsort(-scores, kind="stable")  # ties keep label order
    top = [(labels[j], float(scores[j])) for j in order[:top_k]]
    above = [(labels[j], float(scores[j])) for j in order if scores[j] > threshold]
    return top, above, scores.astype(np.float32)


class _Images(Dataset):
    """index -> (index, preprocessed image (3, H, W), reason); an unreadable image gives zeros and a reason."""

    def __init__(self, items: Sequence[ImageInput], preprocess: Callable, shape: tuple[int, int, int]):
        self.items, self.preprocess, self.shape = items, preprocess, shape

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        item = self.items[i]
        try:
            img = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(item)
            return i, self.preprocess(img), ""
        except BadImage as e:
            return i, torch.zeros(self.shape), e.reason


def _name(item: ImageInput, i: int) -> str:
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"<image {i}>"
    return str(item)


@dataclass
class Tagger:
    """CLIP + a trained QKS head, ready to tag images with any label list. Build it with `Tagger.load`."""

    clip: torch.nn.Module
    preprocess: Callable  # PIL RGB image -> (3, H, W), the backbone's own (center crop)
    tokenizer: Callable
    head: QKS
    config: dict[str, Any]  # the checkpoint's config.json
    fingerprint: dict[str, Any]  # the backbone's, equal to the checkpoint's
    templates: list[str]
    device: torch.device
    amp: bool = False  # float16 autocast (CUDA only) for the backbone and the head
    label_cache: LabelEmbeddingCache | None = None

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
    ) -> Tagger:
        """Load the checkpoint's head and the backbone its fingerprint names, and check that they belong together.

        Args:
            checkpoint_dir: a `qks train` (or `qks import-checkpoint`) output directory.
            device: auto (CUDA when present) | cpu | cuda[:N].
            pretrained: the backbone weights (file or open_clip tag), when not where the fingerprint says.
            model: the open_clip model name or config .json; needed when the backbone was built from a config file.
            templates: the prompt templates (a list, or a file one a line); default: the 85-template `prompt_pool`.
            cache_dir: where label embeddings are cached; True: `default_cache_dir()`; None or False: no disk cache.
            amp: float16 autocast on CUDA (ignored on the CPU).
        """
        checkpoint = Path(checkpoint_dir)
        expected = read_checkpoint_config(checkpoint)["fingerprint"]
        dev = resolve_device(device)
        head, config = load_checkpoint(checkpoint, dev)  # before CLIP: a broken checkpoint fails fast
        model_arg, pretrained_arg = backbone_source(checkpoint, expected, model, pretrained)
        clip, preprocess, tokenizer = load_backbone(model_arg, pretrained_arg, dev)
        loaded = json.loads(json.dumps(backbone_fingerprint(clip, model_arg, pretrained_arg)))
        check_backbone(checkpoint, expected, loaded)
        if isinstance(templates, (str, Path)):
            pool = read_templates(templates)
        else:
            pool = list(templates) if templates is not None else prompt_pool()
        trained_with = config.get("label_embedding", {}).get("num_templates")
        if trained_with is not None and trained_with != len(pool):
            log.warning("the head was trained on labels embedded with %d templates; predicting with %d", trained_with,
                        len(pool))  # fmt: skip
        directory = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
        return cls(clip, preprocess, tokenizer, head, config, loaded, pool, dev, amp, LabelEmbeddingCache(directory))

    @property
    def normalize_labels(self) -> bool:
        """Whether the head was trained on L2-normalised label means (`labels.normalize`); predict does the same."""
        return bool(self.config.get("label_embedding", {}).get("normalize", False))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.fingerprint["preprocess"]["size"]
        return 3, int(size[0]), int(size[1])

    def label_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        """(C, E) float32 on the device: the mean of the templates' text features (L2-normalised when the head was
        trained so), from the disk cache when there, else encoded with stage one's `encode_labels` (and cached)."""
        dim = int(self.head.proj.shape[1])
        cache = self.label_cache or LabelEmbeddingCache(None)
        t_hash = templates_sha256(self.templates)
        normalize = self.normalize_labels
        keys = [label_key(self.fingerprint, label, t_hash, normalize) for label in labels]
        found = {i: e for i, k in enumerate(keys) if (e := cache.get(k, dim)) is not None}
        missing = [i for i in range(len(labels)) if i not in found]
        if missing:
            emb = encode_labels(self.clip, self.tokenizer, [labels[i] for i in missing], self.templates,
                                normalize=normalize, device=self.device).numpy()  # (M, E)  # fmt: skip
            for i, row in zip(missing, emb, strict=True):
                cache.put(keys[i], row)
                found[i] = row
        return torch.from_numpy(np.stack([found[i] for i in range(len(labels))])).to(self.device)  # (C, E)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) and label embeddings (C, E) -> logits (B, C) float32 on the CPU."""
        x = pixels.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp):
            tokens = visual_tokens(self.clip, x)  # (B, T, D)
            out = self.head(tokens, label_emb)  # (B, C)
        return out.float().cpu()

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
        """Like `predict`, yielding each batch's predictions as soon as they are computed (for long runs)."""
        if top_k < 1:
            raise QKSError(f"top_k must be at least 1, got {top_k}")
        names, dropped = clean_labels(labels)
        if dropped:
            log.warning("duplicate label(s) removed: %s", ", ".join(dict.fromkeys(dropped)))
        label_emb = self.label_embeddings(names)  # (C, E)
        self.head.eval()
        data = _Images(images, self.preprocess, self.image_shape)
        loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                            pin_memory=self.device.type == "cuda")  # fmt: skip
        with tqdm(total=len(data), unit="img", desc="predict", disable=not progress) as bar:
            for index, pixels, reasons in loader:
                ok = [j for j, r in enumerate(reasons) if not r]
                logits = self.logits(pixels[ok], label_emb).numpy() if ok else np.zeros((0, len(names)))
                row = dict(zip(ok, logits, strict=True))
                for j, i in enumerate(index):
                    name = _name(images[i], i)
                    if reasons[j]:
                        if on_skip is not None:
                            on_skip(name, reasons[j])
                        yield Prediction(name, names, None, None, [], [], skipped=reasons[j])
                        continue
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
        """Tag images with a label list.

        Args:
            images: image paths or PIL images; unreadable files come back with `skipped` set.
            labels: the label names to score (blank entries and repeats are dropped).
            top_k: labels listed per image, best first.
            threshold: sigmoid score above which a label is listed in `above`.
            **kwargs: batch_size, workers (decoding processes), progress (a tqdm bar), on_skip(name, reason).

        Returns:
            One prediction per image, in input order.
        """
        return list(self.iter_predict(images, labels, top_k, threshold, **kwargs))


def _collate(batch: list[tuple[int, torch.Tensor, str]]) -> tuple[list[int], torch.Tensor, list[str]]:
    index, pixels, reasons = zip(*batch, strict=True)
    return list(index), torch.stack(pixels), list(reasons)  # (B, 3, H, W)


# ---------------------------------------------------------------- writing results


CSV_FIELDS = ["image", "rank", "label", "score", "in_top_k", "above_threshold", "skipped"]


def csv_rows(p: Prediction) -> list[dict[str, Any]]:
    """Long format: one row per label in the top-K or above the threshold (rank over all labels); a skipped image
    gets one row with its reason."""
    if p.skipped is not None:
        return [{"image": p.image, "skipped": p.skipped}]
    top, above = {label for label, _ in p.top}, {label for label, _ in p.above}
    order = np.argsort(-p.scores, kind="stable")  # the order `rank` lists labels in
    return [
        {"image": p.image, "rank": r, "label": p.labels[j], "score": round(float(p.scores[j]), 6),
         "in_top_k": int(p.labels[j] in top), "above_threshold": int(p.labels[j] in above), "skipped": ""}
        for r, j in enumerate(order, 1)
        if p.labels[j] in top or p.labels[j] in above
    ]  # fmt: skip
