"""Small synthetic feature caches with learnable structure, written through the real cache API.

Each label c has a direction `pattern_c = P @ emb_c` in token space, where P (D, E) has orthonormal
columns, stored as the cache's `visual_proj`; so `pattern_c @ P = emb_c`, and a label's pattern
projects onto its own embedding. An image's positive labels each appear in a few random patch tokens
(strongly) and in the CLS token (weakly), under noise. CLIP zero-shot (CLS @ P vs embeddings)
therefore scores above chance, a Q-Former that learns to gather the patterns does better, and as
seen and unseen labels share the same construction, training on seen labels transfers to unseen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qks_pipeline.store.features import create_cache
from qks_pipeline.store.fingerprint import make_fingerprint
from qks_pipeline.store.label_store import write_label_embeddings

SYNTHETIC_BACKBONE = {"model": "synthetic", "pretrained": "none", "tokens": "all"}


@dataclass
class SyntheticData:
    # the training store
    train: Path
    # the test store
    test: Path
    # the label-embedding store
    labels: Path
    label_names: list[str]
    num_seen: int


def _label_matrix(
    rng: np.random.Generator, n: int, c: int, max_pos: int, unknown: float
) -> np.ndarray:
    """(n, c) int8: 1 to `max_pos` random positives per image, the rest negative or unknown."""
    labels = np.full((n, c), -1, dtype=np.int8)
    for i in range(n):
        count = rng.integers(1, max_pos + 1)
        labels[i, rng.choice(c, size=count, replace=False)] = 1
    # a few unknowns among the negatives
    labels[(rng.random((n, c)) < unknown) & (labels == -1)] = 0
    return labels


@dataclass(frozen=True)
class _Design:
    """What the train and test stores share: the labels' patterns and the store's shape."""

    names: list[str]
    num_seen: int
    # (C, D): each label's direction in token space
    patterns: np.ndarray
    # (D, E): the cache's visual_proj
    proj: np.ndarray
    views: int
    num_tokens: int
    shard_size: int
    noise: float
    # how strongly the positive labels' patterns show in the CLS token
    cls_weight: float
    backbone: dict
    seed: int  # of the whole set: part of each store's data fingerprint

    def tokens(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        """(n, V, T, D) tokens: each positive label's pattern in 2 random patches (1.0) and CLS."""
        n = labels.shape[0]
        t = self.num_tokens
        d = self.patterns.shape[1]
        out = rng.standard_normal((n, self.views, t, d), dtype=np.float32) * self.noise
        patches = np.arange(1, t)
        for i in range(n):
            pos = np.flatnonzero(labels[i] == 1)
            for v in range(self.views):
                out[i, v, 0] += self.cls_weight * self.patterns[pos].sum(0)
                for c in pos:
                    picked = rng.choice(patches, size=2, replace=False)
                    out[i, v, picked] += self.patterns[c]
        return out

    def data_fingerprint(self, path: Path, n: int) -> dict:
        """What besides the backbone determines a store's content, as stage one records it."""
        return {"split": path.stem, "synthetic_seed": self.seed, "images": n}

    def write_store(
        self, path: Path, rng: np.random.Generator, n: int, invalid: tuple[int, ...]
    ) -> None:
        """A store of `n` images with random labels; the rows in `invalid` are unreadable images."""
        labels = _label_matrix(rng, n, len(self.names), max_pos=3, unknown=0.05)
        paths = [f"img{i:05d}.jpg" for i in range(n)]
        cache = create_cache(
            path,
            fingerprint=make_fingerprint(self.backbone, self.data_fingerprint(path, n)),
            token_shape=(self.num_tokens, self.proj.shape[0]),
            num_views=self.views,
            shard_size=self.shard_size,
            label_names=self.names,
            num_seen=self.num_seen,
            labels=labels,
            paths=paths,
            manifest_index=np.arange(n),
            visual_proj=self.proj,
        )
        tokens = self.tokens(rng, labels)
        valid = np.ones(n, dtype=bool)
        valid[list(invalid)] = False
        # an unreadable image has no tokens
        tokens[~valid] = 0.0
        for shard in range(cache.num_shards):
            rows = cache.shard_rows(shard)
            skipped = [
                {"path": paths[i], "reason": "synthetic"}
                for i in invalid
                if rows.start <= i < rows.stop
            ]
            cache.write_shard(shard, tokens[rows], valid[rows], skipped)


def make_synthetic(
    root: str | Path,
    *,
    num_train: int = 192,
    num_test: int = 96,
    num_seen: int = 8,
    num_unseen: int = 4,
    num_tokens: int = 10,
    dim: int = 32,
    embed_dim: int = 16,
    views: int = 1,
    shard_size: int = 64,
    noise: float = 0.5,
    cls_weight: float = 0.3,
    invalid_train: tuple[int, ...] = (),
    backbone: dict | None = None,
    seed: int = 0,
) -> SyntheticData:
    """Write `train.zarr`, `test.zarr` and `labels.zarr` under `root`; see the module docstring."""
    assert dim >= embed_dim
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = num_seen + num_unseen
    seen = [f"seen{i}" for i in range(num_seen)]
    names = seen + [f"unseen{i}" for i in range(num_unseen)]
    # (D, D) orthonormal
    q = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    # (D, E), P^T P = I
    proj = q[:, :embed_dim].astype(np.float32)
    # (C, E)
    emb = rng.standard_normal((c, embed_dim)).astype(np.float32)
    # (C, E) @ (E, D) -> (C, D)
    patterns = emb @ proj.T
    backbone = backbone or SYNTHETIC_BACKBONE
    data = SyntheticData(
        train=root / "train.zarr",
        test=root / "test.zarr",
        labels=root / "labels.zarr",
        label_names=names,
        num_seen=num_seen,
    )
    design = _Design(
        names=names,
        num_seen=num_seen,
        patterns=patterns,
        proj=proj,
        views=views,
        num_tokens=num_tokens,
        shard_size=shard_size,
        noise=noise,
        cls_weight=cls_weight,
        backbone=backbone,
        seed=seed,
    )
    design.write_store(data.train, rng, num_train, invalid_train)
    design.write_store(data.test, rng, num_test, ())
    # the CLIP baseline's labels: here the same, normalised
    clip = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    fingerprint = make_fingerprint(backbone)
    write_label_embeddings(
        data.labels, names, emb, fingerprint, clip, clip_template="{}", num_seen=num_seen
    )
    return data
