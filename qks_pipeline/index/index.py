"""`Index`: a query index scored against any vocabulary. Tag every image, search the images for
labels, or take the logits of any rows: the Python side of `qks tag`, `qks search` and `qks serve`.

New labels are embedded as `qks predict` embeds them (`Tagger.label_embeddings`: the checkpoint's
prompt pool, the on-disk cache), by the backbone the checkpoint records, loaded on first use and
only when labels come as text. Scores are the head's: sigmoid(max over queries of z . e_label).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qks_pipeline.config import IndexConfig
from qks_pipeline.devices import resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.index.store import IndexStore, checkpoint_identity, open_index, take_rows
from qks_pipeline.predict.tagger import Prediction, Tagger, clean_labels
from qks_pipeline.stage_two.checkpoint import read_config

# why an index row has no scores: stage one could not read its image
UNREADABLE = "unreadable when the feature store was built"


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float64 sigmoid scores, as `predict.tagger.rank` computes them."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def top_labels(scores: np.ndarray, k: int) -> list[np.ndarray]:
    """Per row of scores (B, C), the indices of its k best labels, best first, ties to the lower
    label index (as `predict.tagger.rank`'s stable sort)."""
    k = min(k, scores.shape[1])
    c = scores.shape[1]
    kth = np.partition(scores, c - k, axis=1)[:, c - k]  # (B,) each row's k-th largest
    out = []
    for row, cut in zip(scores, kth, strict=True):
        candidates = np.flatnonzero(row >= cut)  # k of them, more on a tie
        out.append(candidates[np.argsort(-row[candidates], kind="stable")[:k]])
    return out


@dataclass
class Hit:
    """One image found by `Index.search`."""

    row: int  # in the index (and the feature store)
    image: str  # its path, relative to the image root
    score: float  # the lowest of the labels' sigmoid scores: all of them, at least this much
    scores: dict[str, float]  # each label's sigmoid score

    def to_json(self) -> dict[str, Any]:
        scores = {label: round(s, 6) for label, s in self.scores.items()}
        return {
            "image": self.image,
            "row": self.row,
            "score": round(self.score, 6),
            "scores": scores,
        }


@dataclass
class Index:
    """A complete query index, ready to score any label list. Open one with `Index.open`."""

    store: IndexStore
    checkpoint: Path  # the directory whose text side embeds new labels
    device: torch.device
    max_labels: int = IndexConfig.max_labels
    # Tagger.load's options: pretrained, model, templates, cache_dir
    tagger_options: dict[str, Any] = field(default_factory=dict)
    _tagger: Tagger | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        max_labels: int = IndexConfig.max_labels,
        **tagger_options: Any,
    ) -> Index:
        """Open a complete index built by `qks index`.

        Args:
            path: The index: a local directory or an fsspec URL.
            checkpoint: The checkpoint it was built with, when no longer where the index recorded
                it (checked by its identity when labels are embedded).
            device: Where the products and the text tower run.
            max_labels: Most labels one call embeds (`index.max_labels`).
            tagger_options: `Tagger.load`'s `pretrained`, `model`, `templates`, `cache_dir`.
        """
        store = open_index(path)
        store.require_complete()
        directory = Path(checkpoint) if checkpoint is not None else store.checkpoint_dir
        dev = resolve_device(device)
        return cls(store, directory, dev, max_labels, tagger_options)

    @property
    def num_images(self) -> int:
        return self.store.num_images

    @property
    def label_names(self) -> list[str]:
        """The indexed store's own labels, seen then unseen."""
        return self.store.label_names

    @property
    def tagger(self) -> Tagger:
        """The checkpoint's head and backbone, loaded once; refused when the checkpoint is not the
        one the index was built with."""
        if self._tagger is None:
            found = checkpoint_identity(self.checkpoint, read_config(self.checkpoint))
            built = self.store.fingerprint["checkpoint"]
            if found != built:
                weights = f"weights sha256 {found['weights_sha256'][:12]}"
                message = (
                    f"another checkpoint than the index's ({weights}, the index's "
                    f"{built['weights_sha256'][:12]}); give the one it was built with "
                    "(--checkpoint) or rebuild the index"
                )
                raise QKSError(message, self.checkpoint)
            self._tagger = Tagger.load(self.checkpoint, str(self.device), **self.tagger_options)
        return self._tagger

    def embed(
        self, labels: Sequence[str], embeddings: np.ndarray | None = None
    ) -> tuple[list[str], torch.Tensor]:
        """(the labels cleaned as `qks predict` cleans them, their embeddings (C, E) on the
        device): `embeddings` (C, E) when given, else from the text tower and the disk cache."""
        if embeddings is not None:
            names = [str(label) for label in labels]
            assert len(names) == len(embeddings), (len(names), embeddings.shape)
            return names, torch.as_tensor(embeddings, dtype=torch.float32).to(self.device)
        names, _ = clean_labels(labels)
        if len(names) > self.max_labels:
            message = (
                f"{len(names)} labels, more than index.max_labels ({self.max_labels}): each new "
                "label is embedded with the whole prompt pool; raise it with --set "
                "index.max_labels=N"
            )
            raise QKSError(message)
        return names, self.tagger.label_embeddings(names).float()

    def logits(
        self,
        labels: Sequence[str],
        rows: Sequence[int] | np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
    ) -> np.ndarray:
        """The head's logits (R, C) float32 of `rows` (in the order given; default: every valid
        row, ascending); an unreadable image's row is NaN. `embeddings` (C, E): use these for
        `labels` instead of embedding them."""
        _, emb = self.embed(labels, embeddings)
        valid = np.asarray(self.store.valid[:], dtype=bool)
        picked = np.flatnonzero(valid) if rows is None else self._rows(rows)
        wanted = np.unique(picked[valid[picked]])
        table = np.empty((len(wanted), emb.shape[0]), np.float32)  # (R', C) ascending rows
        pos = 0
        for block_rows, logits, _ in self.store.logit_blocks(emb, wanted):
            table[pos : pos + len(block_rows)] = logits.cpu().numpy()
            pos += len(block_rows)
        out = np.full((len(picked), emb.shape[0]), np.nan, np.float32)
        ok = valid[picked]
        out[ok] = table[np.searchsorted(wanted, picked[ok])]
        return out

    def _rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        picked = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(picked) and (picked.min() < 0 or picked.max() >= self.num_images):
            bad = picked[(picked < 0) | (picked >= self.num_images)][0]
            raise QKSError(
                f"row {bad} is not in the index ({self.num_images} rows)", self.store.path
            )
        return picked

    def tag(
        self,
        labels: Sequence[str],
        top_k: int = 5,
        threshold: float = 0.5,
        *,
        rows: Sequence[int] | np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
    ) -> Iterator[Prediction]:
        """Per image (every row, or `rows` ascending), as `Tagger.predict` gives it: the `top_k`
        labels, best first, and every label scored above `threshold`; an image stage one could not
        read comes back with `skipped` set. Streams, a block of rows at a time: memory does not
        grow with the number of images."""
        if top_k < 1:
            raise QKSError(f"top_k must be at least 1, got {top_k}")
        names, emb = self.embed(labels, embeddings)
        picked = None if rows is None else np.unique(self._rows(rows))
        valid = np.asarray(self.store.valid[:], dtype=bool)
        for block_rows, logits, _ in self.store.logit_blocks(emb, picked, valid_only=False):
            block = logits.cpu().numpy()  # (B, C)
            yield from self._predictions(block_rows, block, valid, names, top_k, threshold)

    def tag_rows(
        self,
        labels: Sequence[str],
        rows: Sequence[int] | np.ndarray,
        top_k: int = 5,
        threshold: float = 0.5,
        *,
        embeddings: np.ndarray | None = None,
    ) -> list[Prediction]:
        """`tag` of `rows`, in the order given (a few rows: the images a search found)."""
        picked = self._rows(rows)
        ascending = np.unique(picked)
        found = list(self.tag(labels, top_k, threshold, rows=ascending, embeddings=embeddings))
        return [found[i] for i in np.searchsorted(ascending, picked)]

    def _predictions(
        self,
        rows: np.ndarray,
        logits: np.ndarray,
        valid: np.ndarray,
        names: list[str],
        top_k: int,
        threshold: float,
    ) -> Iterator[Prediction]:
        """One block's predictions: logits (B, C) of `rows`."""
        scores = sigmoid(logits)  # (B, C)
        paths = take_rows(self.store.paths, rows)
        best = top_labels(scores, top_k)
        for i, (row, path) in enumerate(zip(rows, paths, strict=True)):
            if not valid[row]:
                yield Prediction(str(path), names, None, None, [], [], skipped=UNREADABLE)
                continue
            s = scores[i]
            above = np.flatnonzero(s > threshold)
            above = above[np.argsort(-s[above], kind="stable")]
            pairs = [[(names[j], float(s[j])) for j in which] for which in (best[i], above)]
            yield Prediction(str(path), names, s.astype(np.float32), logits[i], *pairs)

    def search(
        self, labels: Sequence[str], top: int = 10, *, embeddings: np.ndarray | None = None
    ) -> list[Hit]:
        """The `top` images that score highest for the label, or for all the labels (the lowest
        of their scores), best first (ties: the lower row first). Streams over the index."""
        if top < 1:
            raise QKSError(f"top must be at least 1, got {top}")
        names, emb = self.embed(labels, embeddings)
        best_rows = np.zeros(0, np.int64)
        best_logits = np.zeros((0, len(names)), np.float32)
        for block_rows, logits, _ in self.store.logit_blocks(emb):
            best_rows = np.concatenate([best_rows, block_rows])
            best_logits = np.concatenate([best_logits, logits.cpu().numpy()])
            keep = np.lexsort((best_rows, -best_logits.min(axis=1)))[:top]
            best_rows = best_rows[keep]
            best_logits = best_logits[keep]
        paths = take_rows(self.store.paths, best_rows) if len(best_rows) else []
        hits = []
        for row, path, logits in zip(best_rows, paths, best_logits, strict=True):
            scores = sigmoid(logits)
            per_label = {name: float(s) for name, s in zip(names, scores, strict=True)}
            hits.append(Hit(int(row), str(path), float(scores.min()), per_label))
        return hits
